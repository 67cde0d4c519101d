# The two commands a newcomer needs: `make export` (sets up, trains, exports) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ONNXGEN := $(BIN)/onnxgen
PRESET ?= small
NAME   ?= default
# GPU=1: onnxruntime-gpu instead of onnxruntime (never both: they install the same module)
GPU    ?=
ORT    := $(if $(GPU),gpu,cpu)
NOT_ORT := $(if $(GPU),onnxruntime,onnxruntime-gpu)

.PHONY: install export test bench clean

install: $(VENV)/.installed-$(ORT)

# torch first, pinned: the local CPU wheel. An unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed-$(ORT): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip uninstall --quiet --yes $(NOT_ORT) 2>/dev/null || true
	$(BIN)/pip install --quiet -e ".[dev,$(ORT)]"
	rm -f $(VENV)/.installed-*
	touch $@

export: install
	$(ONNXGEN) train --preset $(PRESET) --out models/$(PRESET) --auto-resume
	$(ONNXGEN) export models/$(PRESET) --out exports/$(NAME) --force

test: install
	$(BIN)/python -m pytest -q

# onnxgen against PyTorch, Optimum and onnxruntime-genai: writes benchmarks/RESULTS.md and results.png
# CPU only: onnxruntime-genai depends on (CPU) onnxruntime, which must not sit beside onnxruntime-gpu
bench: install
	$(if $(GPU),$(error make bench: CPU only (onnxruntime-genai pulls in onnxruntime); run it without GPU=1))
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) exports/* models/*/ .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
