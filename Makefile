# `make sweep` and `make test` create the virtual environment .venv on first use.
VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup sweep test benchmark

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

sweep: setup
	$(VENV)/bin/kdsweep sweep=temperature_alpha

test: setup
	$(PYTHON) -m pytest

benchmark: setup
	$(PYTHON) -m benchmarks
