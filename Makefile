# The two commands of the README: `make run` and `make test`.
# Both create (or reuse) .venv and install the project into it; a second call
# reinstalls only when pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# prepare -> pretrain -> evaluate -> export on the embedded default corpus.
run: $(STAMP)
	$(PY) jobs/main.py $(ARGS)

# Two pytest-xdist workers: one runs every test that uses Ray (one local Ray instance), the other
# the tests without Ray meanwhile (tests/testkit/xdist_units.py). XDIST= runs serially.
XDIST ?= -n 2

# The whole suite (CI runs this). pytest exits 5 when it collects no test; make propagates
# any non-zero exit.
test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The quick loop while you work: everything except the end-to-end jobs marked `slow`.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
