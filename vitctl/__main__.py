"""`python -m vitctl` runs the command line."""

from vitctl.cli import main

if __name__ == "__main__":
    main()
