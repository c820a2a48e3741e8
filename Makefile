# The two set-up commands of README.md: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The JupyterLab extension: `pip install -e` builds it from labextension/ (needs Node.js);
# after edits of its sources, `make run` / `make test` build it again.
LABEXT := mig_kernel/labextension/package.json
LABEXT_SOURCES := $(wildcard labextension/src/*.ts labextension/style/*.css labextension/style/*.js) \
	labextension/package.json labextension/tsconfig.json

.PHONY: run test lint venv labextension bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

$(LABEXT): $(LABEXT_SOURCES) | $(VENV)/.installed
	cd labextension && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npm install --no-audit --no-fund
	cd labextension && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" npm run build
	touch $@

labextension: $(LABEXT)

# JupyterLab with the demos and the broker embedded; Ctrl-C stops both (make run ARGS="--no-browser").
run: $(VENV)/.installed $(LABEXT)
	$(VENV)/bin/mig-kernel lab $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint $(LABEXT)
	$(PY) -m pytest

# The CPU half of the performance report (docs/performance.md): Ray, Dask and matplotlib too.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/report.py --suite cpu $(ARGS)
