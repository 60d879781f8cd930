SHELL := /bin/bash
# The two commands of the README. Both create .venv if missing and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	set -o pipefail; $(PY) -m pip install -q -e '.[test,pose,data,eval,video,serve]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	bash tests/install_browser.sh
	bash tests/run_all.sh $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m train.demo

clean:
	rm -rf $(VENV) outputs .pytest_cache
