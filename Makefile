# The two set-up commands (README): `make demo` runs the main job, `make test` the whole
# test suite. Each creates or reuses the virtual environment in .venv, installs the pinned
# torch + torchvision pair first, then vitctl. Why this pair: timm (tests, bench) imports
# torchvision, and torch 2.14.1 + torchvision 0.29.1 is the pair that imports cleanly here.
# On Linux x86-64 PyPI's torch 2.14.1 is the CUDA 13 build: it runs on CPU, but with its
# nvidia-* and triton packages it takes about 5.3 GB. The CPU-only wheels are only on
# download.pytorch.org, which these machines cannot reach. To keep a torch you already
# have, run `pip install -e ".[dev]"` in its environment instead.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitctl-installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitctl info vit-22b
	$(VENV)/bin/vitctl demo --force

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/vitctl bench

clean:
	rm -rf $(VENV) .pytest_cache
