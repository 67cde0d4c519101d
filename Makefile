# The two commands a newcomer needs: `make export` (sets up, trains, exports) and `make test`.
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

export: install
	$(ONNXGEN) train --preset $(PRESET) --out models/$(PRESET) --auto-resume
	$(ONNXGEN) export models/$(PRESET) --out exports/$(NAME) --force

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) exports/* models/*/ .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
