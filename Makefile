# medsilo: `make demo` runs the main job on real data, `make test` the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup system-packages demo demo-dicom test test-fast bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# A 5-hospital federation on PneumoniaMNIST with DP-SGD (ε=8, δ=1e-5 per site), compared with
# pooled and local-only training. Results: runs/demo/ (summary.json, report.md, model-best.safetensors).
demo: setup
	$(BIN)/medsilo simulate --dataset pneumoniamnist --sites 5 --partition dirichlet:0.5 \
		--epsilon 8 --delta 1e-5 --compare --out runs/demo --overwrite

# The hospital journey on DICOM: each of 3 hospitals holds a DICOM archive (per-site equipment, synthetic PHI)
# that its node ingests; then the pre-flight report of one archive. Results: runs/demo-dicom/.
demo-dicom: setup
	$(BIN)/medsilo simulate --dataset breastmnist --sites 3 --partition dirichlet:0.5 --dicom \
		--epsilon 8 --delta 1e-5 --compare --out runs/demo-dicom --overwrite
	$(BIN)/medsilo site check --data runs/demo-dicom/sites/site-00 --labels runs/demo-dicom/sites/site-00/labels.csv \
		--dataset breastmnist --state-dir runs/demo-dicom/sites/site-00-state --json runs/demo-dicom/site-00-check.json

# Debian packages the tests use (Orthanc, Chromium, iproute2, openssh-client, systemd): installed when run as root.
system-packages:
	bash .ci/system-packages

test: system-packages setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
