# The two set-up commands (README): `make demo` runs the main job, `make test` the whole
# test suite. Each creates or reuses the virtual environment in .venv, installs the
# pinned torch first (a bare `torch` requirement would pull a multi-GB CUDA build; the
# 2.14.1 + torchvision 0.29.1 pair is the one timm imports cleanly with), then vitctl.
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
