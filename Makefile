# Two set-up commands (README): `make demo` installs and runs the whole job on the tiny model,
# `make test` installs and runs the tests. Both work on a CPU-only machine with no Hub access.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo_output

.PHONY: install test demo clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 tests

demo: install
	bash demo.sh $(PY) $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO)
