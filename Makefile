PYTHON ?= python3
PIP := $(PYTHON) -m pip
# One stamp per interpreter: a fresh virtual environment always installs.
STAMP := .installed-$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])').stamp

.PHONY: install test test-fast lint demo batch-demo bench clean

install: $(STAMP)

# torch is pinned first so pip takes the CPU build on this machine instead of a CUDA download.
$(STAMP): pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,dask,onnx]"
	@touch $(STAMP)

test: install
	$(PYTHON) -m pytest

# The suite without the tests marked slow (large zoo nets, subprocess and signal tests).
test-fast: install
	$(PYTHON) -m pytest -m "not slow"

lint: install
	$(PYTHON) -m ruff check repconv tests benchmarks
	$(PYTHON) -m ruff format --check repconv tests benchmarks

demo: install
	$(PYTHON) -m repconv demo

# Train checkpoints of ten zoo models (written once), converted by one batch run.
batch-demo: install
	$(PYTHON) benchmarks/zoo_checkpoints.py configs/zoo.toml
	$(PYTHON) -m repconv batch configs/zoo.toml --resume --report zoo-deploy/report.md

bench: install
	$(PYTHON) benchmarks/run.py
	$(PYTHON) benchmarks/batch.py

clean:
	rm -rf .installed-*.stamp build *.egg-info .pytest_cache demo-out zoo-train zoo-deploy
