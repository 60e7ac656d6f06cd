PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .installed.stamp

.PHONY: install test lint demo bench clean

install: $(STAMP)

# torch is pinned first so pip takes the CPU build on this machine instead of a CUDA download.
$(STAMP): pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,dask]"
	@touch $(STAMP)

test: install
	$(PYTHON) -m pytest

lint: install
	$(PYTHON) -m ruff check repconv tests benchmarks
	$(PYTHON) -m ruff format --check repconv tests benchmarks

demo: install
	$(PYTHON) -m repconv demo

bench: install
	$(PYTHON) benchmarks/run.py

clean:
	rm -rf $(STAMP) build *.egg-info .pytest_cache demo-out
