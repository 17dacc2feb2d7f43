"""File formats vitctl reads and writes, one module per format, below every command.

Nothing here imports vitctl.convert, a command or an app: a format knows files, names and
arrays, not what a conversion or a training run does with them.
"""
