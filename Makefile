# The two set-up commands of README.md: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# JupyterLab with the demos and the broker embedded; Ctrl-C stops both (make run ARGS="--no-browser").
run: $(VENV)/.installed
	$(VENV)/bin/mig-kernel lab $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest
