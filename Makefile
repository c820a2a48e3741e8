# The two set-up commands of README.md: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The JupyterLab extension: `pip install -e` builds it from labextension/ (needs Node.js);
# after edits of its sources, `make run` / `make test` build it again.
LABEXT := mig_kernel/labextension/package.json
LABEXT_SOURCES := $(wildcard labextension/src/*.ts labextension/style/*.css labextension/style/*.js) \
	labextension/package.json labextension/tsconfig.json

.PHONY: run test lint venv labextension bench browser soak

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

# Python with ruff; the extension's TypeScript and CSS with prettier (labextension/package.json).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	[ -x labextension/node_modules/.bin/prettier ] || \
		(cd labextension && npm install --no-audit --no-fund)
	cd labextension && npm run --silent lint:check

# Everything CI runs. The browser test (tests/test_browser.py) drives Debian's Chromium; where it
# is missing, pytest skips that test and this says so, with the one command that installs it.
test: lint $(LABEXT)
	@command -v chromium >/dev/null || echo "make test: no chromium, so tests/test_browser.py \
	is skipped; 'make browser' installs it (apt-get install chromium fonts-dejavu-core)" >&2
	$(PY) -m pytest

# The long reliability runs (tests marked soak: 100 clients x 100 invocations under injected
# faults; docs/reliability.md quotes its figures). `make test` runs their short versions.
soak: $(VENV)/.installed
	$(PY) -m pytest -m soak -s $(ARGS)

# Debian's Chromium and a font for the browser test's screenshots (Playwright never downloads a
# browser here); as root, or through sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium fonts-dejavu-core

# The CPU half of the performance report (docs/performance.md): Ray, Dask and matplotlib too.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/report.py --suite cpu $(ARGS)
