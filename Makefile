# mmreid-jax: `make demo` trains and evaluates on the synthetic set; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
CONFIG ?= configs/synthetic.py

.PHONY: demo test test-all install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m mmreid_jax.main --config $(CONFIG) --workdir $(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup

# Includes the tests marked slow (full-size training); not part of CI.
test-all: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup -m ''

clean:
	rm -rf $(VENV) runs
