"""The export folder runs unchanged in JavaScript: onnxruntime-node gives Python ORT's logits for the
fp32 and int8 variants (cache chained over two steps, left-padded batch), and transformers.js,
loading the folder from disk, tokenizes and generates greedily exactly as onnxgen does.

tests/js/ship.mjs does the JavaScript side; this file builds its job and checks every number.
The npm packages are installed by `make test` (npm ci in tests/js); if they are missing and npm is
on PATH, the fixture installs them, and skips only when node/npm are absent or the install fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import HF_FAMILIES, ROOT, TEST_CORPUS
from pipeline.exports import VARIANTS, variant_path
from pipeline.run.lm import Generation, OnnxLM

JS = ROOT / "tests" / "js"
# Both languages run the same ORT CPU kernels (onnxruntime-node 1.30, Python 1.31), fp32 and int8 alike:
# measured bit-identical (max |Δ| = 0.0) here. 1e-4 leaves room for a kernel change between those
# versions; a wrong input, mask, position or cache is off by far more than that.
ATOL = 1e-4
MAX_NEW = 20
TEXTS = ["def parse_header(line):\n    return", "# héllo wörld ✓\n\tx = {'a': 1}", "import os\nfrom email import"]
# transformers.js's dtype option names the file: q8 -> model_quantized.onnx (our int8), q4 -> model_q4.onnx
DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}


@pytest.fixture(scope="session")
def node_modules() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: cannot run onnxruntime-node / transformers.js")
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        # onnxruntime-node's install script would download CUDA binaries; its CPU build ships in the package
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True,
                              env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, timeout=600)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"npm ci in tests/js failed, JS runtimes unavailable: {last}")
    return JS / "node_modules"


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def _case(lm: OnnxLM) -> dict:
    """Two left-padded rows of held-out-like text, fed in two steps (past 0, then past 30)."""
    ids = lm.encode((TEST_CORPUS / "header.py").read_text()[:4000])[:40]
    rows = [ids, ids[10:35]]
    L = len(ids)
    x = np.full((2, L), lm.pad_id, np.int64)
    mask = np.zeros((2, L), np.int64)
    for b, r in enumerate(rows):
        x[b, L - len(r):], mask[b, L - len(r):] = r, 1
    pos = _positions(mask)
    split = 30
    steps = [dict(input_ids=x[:, :split], attention_mask=mask[:, :split], position_ids=pos[:, :split]),
             dict(input_ids=x[:, split:], attention_mask=mask, position_ids=pos[:, split:])]
    return {"steps": steps, "rows": rows, "batch": dict(input_ids=x[:, :20].copy(), attention_mask=mask[:, :20].copy())}


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x.tolist() if isinstance(x, np.ndarray) else x


def _trim(tokens: list[int], eos: int) -> list[int]:
    """transformers.js keeps a finished row going with pad tokens; onnxgen stops it after eos."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def lfm2_export(hf_models, tmp_path_factory) -> Path:
    """A tiny LFM2 import with its int8 variant: conv layers beside attention layers, the conv state fed back
    as past_conv.{i} / present_conv.{i} (docs/contract.md part 3)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.convert.hf_import import export_hf
    from pipeline.convert.quantize import quantize

    root = tmp_path_factory.mktemp("lfm2-js")
    config = AutoConfig.for_model("lfm2", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  block_multiple_of=16, layer_types=["conv", "full_attention", "conv", "full_attention"],
                                  vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "src")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf_models["llama"] / name, root / "src" / name)
    assert export_hf(root / "src", root / "lfm2", corpus=str(TEST_CORPUS)).passed
    quantize(root / "lfm2", "int8", progress=False)
    return root / "lfm2"


@pytest.fixture(scope="module")
def js_run(node_modules, tiny_export, hf_exports, int8_exports, tiny_quantized, lfm2_export, tmp_path_factory):
    """One node process for every folder (its start-up and imports are the slow part)."""
    folders = {"tiny": tiny_quantized[0], "llama+int8": int8_exports["llama"]}  # tiny: all four variants
    folders.update({f"hf-{family}": hf_exports[family] for family in HF_FAMILIES if family != "llama"})
    folders["hf-lfm2"] = lfm2_export
    # every variant the folder has: fp16/int4 join in once the fixtures make them
    folders = {k: (f, [v for v in VARIANTS if variant_path(f, v).is_file()]) for k, f in folders.items()}
    assert folders["tiny"][1] == list(VARIANTS) and "int8" in folders["llama+int8"][1]
    jobs, cases = [], {}
    for key, (folder, variants) in folders.items():
        lm = OnnxLM(folder)
        case = cases[key] = _case(lm)
        batch = case["batch"]
        jobs.append({
            "folder": str(folder), "texts": TEXTS, "max_new_tokens": MAX_NEW,
            "variants": {v: {"file": str(Path("onnx") / VARIANTS[v]), "dtype": DTYPES[v]} for v in variants},
            "steps": case["steps"], "prompts": [lm.encode(t) for t in TEXTS], "batch": batch,
        })
    work = tmp_path_factory.mktemp("js")
    (work / "job.json").write_text(json.dumps(_jsonable({"exports": jobs})))
    proc = subprocess.run(["node", str(JS / "ship.mjs"), str(work / "job.json"), str(work / "result.json")],
                          cwd=JS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "result.json").read_text())["exports"]
    return {key: (folders[key][0], jobs[i], cases[key], results[i]) for i, key in enumerate(folders)}


KEYS = ["tiny", "llama+int8"] + [f"hf-{f}" for f in HF_FAMILIES if f != "llama"] + ["hf-lfm2"]


def _logits(r: dict) -> np.ndarray:
    return np.asarray(r["logits"], np.float32).reshape(r["dims"])


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_onnxruntime_node_logits_equal_python(js_run, key):
    folder, job, case, result = js_run[key]
    for variant in job["variants"]:
        lm = OnnxLM(folder, variant=variant)
        past = lm.empty_past(2)
        for s, (step, got) in enumerate(zip(case["steps"], result["variants"][variant]["ort"])):
            want, past = lm.forward(step["input_ids"], step["attention_mask"], step["position_ids"], past)
            got = _logits(got)
            assert got.shape == want.shape
            # every position, padding included: the same graph on the same inputs
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"{variant} step {s + 1}")


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_transformers_js_tokenizes_and_generates_as_onnxgen(js_run, key):
    folder, job, case, result = js_run[key]
    lm = OnnxLM(folder)
    assert result["tokenizer"] == [lm.encode(t) for t in TEXTS]
    for variant in job["variants"]:
        lm = OnnxLM(folder, variant=variant)
        r = result["variants"][variant]
        # a forward pass through transformers.js' own input handling (it makes position_ids itself):
        # equal to ours wherever the mask is 1 (padding positions hold arbitrary values by design)
        step = case["steps"][0]
        want, _ = lm.forward(step["input_ids"], step["attention_mask"], step["position_ids"], lm.empty_past(2))
        got = _logits(r["forward"])
        real = step["attention_mask"].astype(bool)
        np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0, err_msg=variant)
        for prompt, tokens in zip(job["prompts"], r["greedy"]):
            want = [int(t[0]) for t in lm.generate([prompt], max_new_tokens=MAX_NEW)]
            assert _trim(tokens, lm.eos_id) == want, (variant, prompt)
        # a left-padded batch of two prompts of different lengths
        batch = job["batch"]
        prompts = [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(batch["input_ids"], batch["attention_mask"])]
        assert len(prompts[0]) != len(prompts[1])
        gen = Generation()
        for _ in lm.generate(prompts, max_new_tokens=MAX_NEW, result=gen):
            pass
        assert [_trim(t, lm.eos_id) for t in r["batch"]] == gen.tokens, variant
