# The two commands a newcomer needs: `make export` (sets up, trains, exports fp32 + int8/int4/fp16, checks
# parity of every variant) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ONNXGEN := $(BIN)/onnxgen
PRESET ?= small
NAME   ?= default

.PHONY: install export test clean

install: $(VENV)/.installed

# torch first, pinned: the local CPU wheel. An unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# `onnxgen parity` exits 1 when any variant misses its threshold, so `make export` fails loudly.
export: install
	$(ONNXGEN) train --preset $(PRESET) --out models/$(PRESET) --auto-resume
	$(ONNXGEN) export models/$(PRESET) --out exports/$(NAME) --force
	$(ONNXGEN) quantize exports/$(NAME) --variant all
	$(ONNXGEN) parity exports/$(NAME)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) exports/* models/*/ .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
