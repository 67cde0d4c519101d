"""Quantization recipes scored against the export's own fp32 graph, llama-perplexity style (issue 13).

    python benchmarks/quant_quality.py --export /work/cache/smol-q --recipes int8,int4      # measure
    python benchmarks/quant_quality.py --export /work/cache/smol-q --report                 # QUANT.md + PNG

Text: the standard library's pydoc_data/topics.py (~750 KB of English documentation, offline everywhere).
Its topics are shuffled with a fixed seed; the first ones, until CHUNKS chunks are filled, are the
evaluation text, the rest is written to calibration.txt (for GPTQ: disjoint from what is scored).
Scoring: the evaluation text is tokenized as one stream and cut into CHUNKS chunks of CTX tokens, each run
from an empty cache; the second half of each chunk is scored (the CTX/2 tokens 128..255, each predicted
from the position before it, so every scored token sees at least 128 tokens of context): 64 x 128 = 8,192
scored tokens. The fp32 graph's log-probabilities are computed once and cached as fp16 (.npy under the
cache folder); the error that rounding adds is measured and reported as the "fp32 (cache floor)" row.
Metrics are the project's own (pipeline.check.parity._Score): mean KL(fp32 || variant), same top-1, PPL
ratio. Decode speed: batch 1, 64-token prompt then 32 single-token steps through the plain graph
(past fed back), median step, 2 threads; indicative only (this machine is shared).

Each measured recipe is appended to results.json in the cache folder; --report writes benchmarks/QUANT.md
and benchmarks/quant_quality.png from it (size against KLD, one point per recipe, llama.cpp's points).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.convert.quantize.calibration import text_windows  # noqa: E402
from pipeline.convert.quantize.recipe import Recipe  # noqa: E402
from pipeline.convert.quantize.variants import quantize_weights  # noqa: E402
from pipeline.check.parity import Thresholds, _Score  # noqa: E402
from pipeline.tokenizer import load_tokenizer  # noqa: E402

CTX, CHUNKS, SEED = 256, 64, 1234
BATCH = 2  # chunks per forward call (a 49k vocabulary: 50 MB of logits per chunk)
CACHE = Path("/work/cache/quant_bench")
HESSIANS: dict = {}  # GPTQ recipes of one run share the calibration Hessians
# issue 13's reference points, same model (SmolLM2-135M-Instruct), same method (their 4,826 tokens)
REFERENCE = [("llama.cpp Q8_0", 145, 0.0055, 0.952, 1.004), ("llama.cpp Q6_K", 138, 0.0134, 0.933, 1.015),
             ("llama.cpp Q4_K_M", 105, 0.084, 0.850, 1.081), ("llama.cpp Q4_0", 92, 0.347, 0.681, 1.269),
             ("genai builder int4", 86, 0.439, 0.632, 1.372)]


def R(**kw) -> Recipe:
    """A named recipe as it was measured: fp32 scales (fp16 scales came later, and are Recipe's default)."""
    return Recipe(**{"scales": "fp32", **kw})


# name -> Recipe. "int4" and "int8" are the branch's recipes before issue 13 (block 32, accuracy_level 4).
RECIPES: dict[str, Recipe] = {
    "int8": R(bits=8, eight_bit=()),
    "int8-acc1": R(bits=8, eight_bit=(), accuracy_level=1),
    "int8-acc0": R(bits=8, eight_bit=(), accuracy_level=0),
    "int8-b16": R(bits=8, eight_bit=(), block_size=16),
    "int8-acc0-head": R(bits=8, eight_bit=(), fp32_compute=("head",)),
    "int8-acc0-down": R(bits=8, eight_bit=(), fp32_compute=("down",)),
    "int8-acc0-qkv": R(bits=8, eight_bit=(), fp32_compute=("qkv",)),
    "int8-acc0-gate_up": R(bits=8, eight_bit=(), fp32_compute=("gate_up",)),
    "int8-acc0-o": R(bits=8, eight_bit=(), fp32_compute=("o",)),
    "int8-b64-acc0": R(bits=8, eight_bit=(), accuracy_level=0, block_size=64),
    "int8-b128-acc0": R(bits=8, eight_bit=(), accuracy_level=0, block_size=128),
    "int4": R(),
    "int4-acc0": R(accuracy_level=0),
    "int4-head4": R(head="int4"),
    "int4-asym": R(symmetric=False),
    "int4-asym-acc0": R(symmetric=False, accuracy_level=0),
    "int4-b64": R(block_size=64),
    "int4-b64-asym": R(block_size=64, symmetric=False),
    "int4-b128-asym": R(block_size=128, symmetric=False),
    "int4-hqq": R(method="hqq"),
    "int4-hqq-b64": R(method="hqq", block_size=64),
    "int4-hqq-b128": R(method="hqq", block_size=128),
    "int4-gptq": R(method="gptq"),
    "int4-gptq-asym": R(method="gptq", symmetric=False),
    "int4-gptq-b64-asym": R(method="gptq", block_size=64, symmetric=False),
    "int4-gptq-b128-asym": R(method="gptq", block_size=128, symmetric=False),
    "int4-gptq-asym+qkv": R(method="gptq", symmetric=False, eight_bit=("first_last", "qkv")),  # import default
    "int4-gptq-b64-asym+qkv1-2": R(method="gptq", block_size=64, symmetric=False, eight_bit=("first_last", "qkv:1-2")),
    "int4-gptq-b64-asym-head4+qkv": R(method="gptq", block_size=64, symmetric=False, head="int4",
                                      eight_bit=("first_last", "qkv")),
    # sensitivity probes: everything 4-bit (head 8) except one tensor kind at 8 bits
    "int4-all4": R(eight_bit=()),
    "int4-all4+qkv": R(eight_bit=("qkv",)),
    "int4-all4+o": R(eight_bit=("o",)),
    "int4-all4+gate_up": R(eight_bit=("gate_up",)),
    "int4-all4+down": R(eight_bit=("down",)),
}


def parse_recipe(name: str) -> Recipe:
    """A name from RECIPES, or key=value pairs joined by '/' (e.g. method=gptq/block_size=64/eight_bit=down:0-3)."""
    if name in RECIPES:
        return RECIPES[name]
    kw = {}
    for part in name.split("/"):
        k, _, v = part.partition("=")
        if k in ("eight_bit", "fp32_compute"):
            kw[k] = tuple(x for x in v.split("+") if x)
        elif k in ("bits", "block_size", "accuracy_level", "head_block"):
            kw[k] = int(v)
        elif k in ("symmetric", "act_order", "grid_search"):
            kw[k] = v in ("1", "true", "True")
        else:
            kw[k] = v
    return Recipe(**kw)


# ----------------------------------------------------------------------------- text
def topics_text() -> tuple[list[str], list[str]]:
    """(evaluation topics, calibration topics): pydoc_data/topics.py shuffled with SEED."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    scope: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), scope)
    topics = scope["topics"]
    keys = sorted(topics)
    order = np.random.default_rng(SEED).permutation(len(keys))
    return [topics[keys[i]] for i in order], keys


def split(folder: Path, cache: Path) -> tuple[np.ndarray, Path]:
    """(CHUNKS, CTX) evaluation chunks and the path of the calibration text (the remaining topics)."""
    tok = load_tokenizer(folder / "tokenizer.json", require_eot=False)
    docs, _ = topics_text()
    need, ids, k = CHUNKS * CTX, [], 0
    while len(ids) < need:
        ids.extend(tok.encode(docs[k] + "\n\n", add_special_tokens=False).ids)
        k += 1
    chunks = np.asarray(ids[:need], np.int64).reshape(CHUNKS, CTX)
    calib = cache / "calibration.txt"
    text = "\n\n".join(docs[k:])
    if not calib.is_file() or calib.read_text(encoding="utf-8") != text:
        calib.write_text(text, encoding="utf-8")
    return chunks, calib


# ----------------------------------------------------------------------------- running a graph
def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def feed(sess, ids: np.ndarray) -> dict:
    f = {"input_ids": ids, "attention_mask": np.ones_like(ids),
         "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            f[i.name] = np.zeros((len(ids), i.shape[1], 0, i.shape[3]), np.float32)
    return f


def scored_logits(sess, chunks: np.ndarray):
    """Per batch: (b, CTX/2, V) logits at positions CTX/2-1 .. CTX-2 (predicting the second half)."""
    h = CTX // 2
    for s in range(0, len(chunks), BATCH):
        ids = chunks[s:s + BATCH]
        logits = sess.run(["logits"], feed(sess, ids))[0]
        yield s, logits[:, h - 1:CTX - 1]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(folder: Path, chunks: np.ndarray, cache: Path) -> np.ndarray:
    """(CHUNKS, CTX/2, V) fp16 log-probs of the fp32 graph, computed once; the floor row is recorded."""
    path = cache / "ref_logprobs.npy"
    ids_path = cache / "ref_ids.npy"
    if path.is_file() and ids_path.is_file() and np.array_equal(np.load(ids_path), chunks):
        return np.load(path, mmap_mode="r")
    sess = session(folder / "onnx" / "model.onnx")
    out = None
    floor = _Score(Thresholds(), stride=1 << 30)
    targets = chunks[:, CTX // 2:]
    t0 = time.time()
    for s, logits in scored_logits(sess, chunks):
        lp = log_softmax(logits)
        if out is None:
            out = np.lib.format.open_memmap(str(path) + ".tmp.npy", "w+", np.float16,
                                            (CHUNKS, CTX // 2, lp.shape[-1]))
        out[s:s + len(lp)] = lp.astype(np.float16)
        b = len(lp)
        floor.add(lp, out[s:s + b].astype(np.float64), targets[s:s + b], np.ones(targets[s:s + b].shape, bool))
        print(f"  reference {s + b}/{CHUNKS} chunks ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    out.flush()
    del out
    os.replace(str(path) + ".tmp.npy", path)
    np.save(ids_path, chunks)
    r = floor.result("fp32 (cache floor)")
    size = sum(f.stat().st_size for f in (folder / "onnx").glob("model.onnx*"))
    save_result(cache, {"name": "fp32 (cache floor)", "recipe": {"method": "none: fp32 vs its fp16 cache"},
                        "bytes": size, "kl_mean": r.kl_mean, "top1": r.top1, "ppl_ratio": r.ppl_ratio,
                        "ppl_reference": r.ppl_reference, "scored": r.scored, "decode_ms": None,
                        "build_s": None, "eval_s": time.time() - t0})
    return np.load(path, mmap_mode="r")


def decode_ms(path: Path, prompt: np.ndarray, steps: int = 32) -> float:
    """Median ms of one decode step (batch 1, after a 64-token prefill), plain graph."""
    sess = session(path)
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    present = [o.name for o in sess.get_outputs() if o.name.startswith("present.")]
    ids = prompt[None, :64]
    outs = sess.run(["logits", *present], feed(sess, ids))
    n, times = ids.shape[1], []
    for _ in range(steps):
        nxt = np.array([[int(outs[0][0, -1].argmax())]], np.int64)
        f = {"input_ids": nxt, "attention_mask": np.ones((1, n + 1), np.int64),
             "position_ids": np.array([[n]], np.int64), **dict(zip(past_names, outs[1:]))}
        t = time.perf_counter()
        outs = sess.run(["logits", *present], f)
        times.append(time.perf_counter() - t)
        n += 1
    return 1000 * float(np.median(times))


def evaluate(path: Path, ref: np.ndarray, chunks: np.ndarray) -> dict:
    sess = session(path)
    score = _Score(Thresholds(), stride=1 << 30)
    targets = chunks[:, CTX // 2:]
    for s, logits in scored_logits(sess, chunks):
        b = len(logits)
        score.add(ref[s:s + b].astype(np.float64), logits, targets[s:s + b], np.ones(targets[s:s + b].shape, bool))
    r = score.result(path.name)
    return {"kl_mean": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1, "top1_low": r.top1_low,
            "ppl_ratio": r.ppl_ratio, "ppl_reference": r.ppl_reference, "scored": r.scored}


# ----------------------------------------------------------------------------- results
def load_results(cache: Path) -> list[dict]:
    p = cache / "results.json"
    return json.loads(p.read_text()) if p.is_file() else []


def save_result(cache: Path, r: dict) -> None:
    rs = [x for x in load_results(cache) if x["name"] != r["name"]] + [r]
    tmp = cache / "results.json.tmp"
    tmp.write_text(json.dumps(rs, indent=1))
    tmp.replace(cache / "results.json")


def optimized_graph(folder: Path, cache: Path) -> Path:
    """The fused fp32 graph every variant starts from (as `onnxgen quantize` makes it), made once."""
    from pipeline.convert.optimize import optimize
    from pipeline.exports import read_config
    from pipeline.model.families import arch_of

    out = cache / "model_optimized.onnx"
    if not out.is_file():
        shape, arch = read_config(folder), arch_of(folder)
        optimize(folder / "onnx" / "model.onnx", out, shape.heads, shape.hidden, fuse=True,
                 norm=arch.norm if arch is not None else "layernorm")
    return out


def measure(folder: Path, cache: Path, name: str, chunks, ref, calib: Path, windows: int) -> dict:
    recipe = parse_recipe(name)
    src = optimized_graph(folder, cache)
    calibration = None
    if recipe.method == "gptq":
        calibration = text_windows(folder, calib.read_text(encoding="utf-8"), windows, CTX, seed=SEED)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        dst = Path(tmp) / "model.onnx"
        t0 = time.time()
        details = quantize_weights(src, dst, recipe, calibration=calibration, progress=True,
                                     hessian_cache=HESSIANS)
        build = time.time() - t0
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        t0 = time.time()
        m = evaluate(dst, ref, chunks)
        ev = time.time() - t0
        ms = decode_ms(dst, chunks[0])
    r = {"name": name, "recipe": {k: v for k, v in details.items() if k != "bits_per_tensor"}, "bytes": size, **m,
         "decode_ms": ms, "build_s": build, "eval_s": ev,
         "calibration_windows": None if calibration is None else int(len(calibration))}
    save_result(cache, r)
    print(f"{name}: {size / 1e6:.1f} MB  KL {m['kl_mean']:.4g}  top-1 {m['top1']:.2%}  PPL ratio {m['ppl_ratio']:.4f}"
          f"  decode {ms:.1f} ms  (build {build:.0f} s, eval {ev:.0f} s)", flush=True)
    return r


# ----------------------------------------------------------------------------- report
def versions() -> str:
    import onnx
    import onnxruntime
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu or platform.processor()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


SHORT = {"smol-q": "converted (weights on the Q4_1 grid)", "smol-dither": "dithered (continuous weights)",
         "small": "small (trained here)"}
MODELS = {  # export folder name -> how the report names it
    "smol-q": "SmolLM2-135M-Instruct (as converted from the Q4_1 GGUF: body weights on a Q4_1 grid)",
    "smol-dither": "SmolLM2-135M-Instruct dithered (benchmarks/quant_dither.py: the same plus one grid step of noise)",
    "small": "small (trained here by a fresh clone's `make export`; its own BPE, Python source)",
}


def table(rs: list[dict]) -> list[str]:
    lines = ["| recipe | method | bits (body/head) | block | sym | acc. level | 8-bit body tensors | size MB | KLD "
             "| same top-1 | PPL ratio | decode ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rs, key=lambda r: -r["bytes"]):
        c = r["recipe"]
        ms = f"{r['decode_ms']:.1f}" if r.get("decode_ms") else ""
        eight = ", ".join(c.get("eight_bit", [])) or ("" if c.get("bits") != 4 else "none")
        if c.get("fp32_compute"):
            eight += f" (fp32 compute: {', '.join(c['fp32_compute'])})"
        block = f"{c.get('block_size', '')}"
        if c.get("lm_head_block", c.get("block_size")) != c.get("block_size"):
            block += f" (head {c['lm_head_block']})"
        lines.append(
            f"| {r['name']} | {c.get('method', '')}{', act order' if c.get('act_order') else ''}{', grid search' if c.get('grid_search') else ''} | "
            f"{c.get('bits', '')}/{c.get('lm_head', '')}{' (gptq)' if c.get('lm_head_method') == 'gptq' else ''} | "
            f"{block} | {'' if 'symmetric' not in c else ('yes' if c['symmetric'] else 'no')} | "
            f"{c.get('accuracy_level', '')} | {eight} | {r['bytes'] / 1e6:.1f} | {r['kl_mean']:.4g} | "
            f"{r['top1']:.2%} | {r['ppl_ratio']:.4f} | {ms} |")
    return lines


def frontier(rs: list[dict]) -> list[dict]:
    """The recipes no other beats on both size and KLD (the reference's cache floor left out)."""
    pts = [r for r in rs if r["kl_mean"] > 0 and "floor" not in r["name"]]
    return [r for r in pts if not any(o["bytes"] <= r["bytes"] and o["kl_mean"] < r["kl_mean"] for o in pts)]


def summary(caches: list[Path], out_md: Path) -> None:
    """A short table per model for benchmarks/RESULTS.md (benchmarks/run.py appends this file): the size/KLD
    frontier and the defaults, pointing at QUANT.md for the rest."""
    lines = ["## Quantization recipes (issue 13)", "",
             f"From `benchmarks/quant_quality.py --report`: each graph against its export's fp32 graph on "
             f"{CHUNKS * CTX // 2:,} scored tokens (details, every recipe and the notes: "
             "[QUANT.md](QUANT.md); size against KLD: [quant_quality.png](quant_quality.png)). Per model, the "
             "recipes no other beats on both size and KLD, and the defaults.", ""]
    for cache in caches:
        rs = load_results(cache)
        keep = {r["name"] for r in frontier(rs)} | {r["name"] for r in rs if "default" in r["name"]
                                                      or r["name"] in ("int4", "int8")}
        lines += [f"**{MODELS.get(cache.name, cache.name)}**", "",
                  "| recipe | size MB | KLD | same top-1 | PPL ratio |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['name']} | {r['bytes'] / 1e6:.1f} | {r['kl_mean']:.4g} | {r['top1']:.2%} | {r['ppl_ratio']:.4f} |"
                  for r in sorted(rs, key=lambda r: -r["bytes"]) if r["name"] in keep]
        lines.append("")
    out_md.write_text("\n".join(lines))


def report(caches: list[Path], out_md: Path, out_png: Path, notes: str = "") -> None:
    lines = [
        "# Quantization recipes on SmolLM2-135M-Instruct and the trained small (issue 13)",
        "",
        f"Made by `benchmarks/quant_quality.py --report` from each model's results.json under {CACHE}. "
        f"Machine: {versions()}.",
        "",
        f"Each graph against its export's own fp32 graph, llama-perplexity style: {CHUNKS} chunks of "
        f"{CTX} tokens of English text (pydoc_data/topics.py, topics shuffled with seed {SEED}), each from an "
        f"empty cache, the second half of each chunk scored: {CHUNKS * CTX // 2:,} tokens. KLD = mean "
        "KL(fp32 ‖ variant) in nats; top-1 = same most likely token; PPL ratio = variant over fp32 on the "
        "text's next tokens. Size = the .onnx file (no external data at these sizes). Decode = median ms of one "
        "batch-1 step after a 64-token prompt, plain graph, 2 threads, on a machine shared with other jobs "
        "(indicative: compare within a few ms only loosely). GPTQ calibrates on 128 windows of 256 tokens of the "
        "other topics (disjoint from the scored text). The `fp32 (cache floor)` row is the error of the fp16 "
        "cache of reference log-probs itself. Recipes are `Recipe` fields of pipeline/convert/quantize.py; "
        "`int4`/`int8` are the recipes before issue 13.",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = [c for c in caches if not c.name.startswith("smol")]
    fig, axes = plt.subplots(1, 2 if small else 1, figsize=(16 if small else 11, 7),
                             gridspec_kw={"width_ratios": [2.2, 1]} if small else None, squeeze=False)
    ax = axes[0][0]
    colors = {"smol-q": "tab:blue", "smol-dither": "tab:green", "small": "tab:purple"}
    for cache in caches:
        rs = load_results(cache)
        if not rs:
            continue
        label = MODELS.get(cache.name, cache.name)
        lines += [f"## {label}", ""] + table(rs) + [""]
        pts = [r for r in rs if r["kl_mean"] > 0 and "floor" not in r["name"]]
        where = axes[0][1] if cache in small else ax
        color = colors.get(cache.name, "tab:gray")
        for r in pts:
            where.scatter(r["bytes"] / 1e6, r["kl_mean"], color=color, s=22,
                          label=SHORT.get(cache.name, cache.name) if r is pts[0] else None)
            where.annotate(r["name"], (r["bytes"] / 1e6, r["kl_mean"]), fontsize=6.5, color=color,
                           xytext=(3, 2), textcoords="offset points")
    if small:
        side = axes[0][1]
        side.set_yscale("log")
        side.set_xlabel("size (MB)")
        side.set_title("the trained small (its own thresholds: issue 9)")
        side.legend(fontsize=8, loc="upper right")
        side.grid(True, which="both", alpha=0.3)
    lines += ["## Issue 13's reference points", "",
              "llama.cpp's `llama-perplexity --kl-divergence` and onnxruntime-genai's builder on the converted "
              "model (4,826 tokens; not re-measured here):", "",
              "| | size MB | KLD | same top-1 | PPL ratio |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {s} | {k} | {t:.1%} | {p} |" for n, s, k, t, p in REFERENCE]
    out_md.write_text("\n".join(lines) + "\n")
    for i, (n, s, k, *_) in enumerate(REFERENCE):
        ax.scatter(s, k, color="tab:red", marker="s", s=28, label="issue 13 references" if i == 0 else None)
        ax.annotate(n, (s, k), fontsize=7, color="tab:red", xytext=(3, -9), textcoords="offset points")
    ax.axhline(0.05, color="gray", ls=":", lw=1)
    ax.axvline(95, color="gray", ls=":", lw=1)
    ax.text(95.5, 0.055, "int4 goal: ≤ 95 MB, KLD ≤ 0.05", fontsize=7, color="gray")
    ax.axhline(0.003, color="gray", ls="--", lw=0.8)
    ax.text(150, 0.0032, "int8 goal: KLD ≤ 0.003", fontsize=7, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("mean KLD vs the export's fp32 graph (nats, log)")
    ax.set_title("SmolLM2-135M-Instruct: size vs KLD, one point per recipe")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, default=Path("/work/cache/smol-q"))
    ap.add_argument("--cache", type=Path, default=None, help=f"[{CACHE}/EXPORT_NAME]")
    ap.add_argument("--recipes", default="", help="comma-separated names (see RECIPES) or key=value/... specs")
    ap.add_argument("--calibration-windows", type=int, default=256)
    ap.add_argument("--graph", type=Path, default=None,
                    help="score this existing graph (e.g. what `onnxgen quantize` wrote) as recipe --graph-name, "
                         "recipe read from the export's manifest")
    ap.add_argument("--graph-name", default="graph")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    import logging

    import onnxruntime.quantization.matmul_nbits_quantizer as mq
    logging.getLogger(mq.__name__).setLevel(logging.WARNING)
    mq.logger.setLevel(logging.WARNING)
    cache = a.cache or CACHE / a.export.name
    cache.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.recipes.split(",") if n]
    if names:
        chunks, calib = split(a.export, cache)
        ref = reference(a.export, chunks, cache)
    if a.graph is not None:
        chunks, _ = split(a.export, cache)
        ref = reference(a.export, chunks, cache)
        from pipeline import manifest
        from pipeline.exports import VARIANTS

        variant = {f: v for v, f in VARIANTS.items()}.get(a.graph.name)  # the recipe: from the graph's own export
        stage = next((st for st in reversed(manifest.load(a.graph.parent.parent).get("stages", []))
                      if st.get("stage") == f"quantize:{variant}"), {})
        t0 = time.time()
        m = evaluate(a.graph, ref, chunks)
        r = {"name": a.graph_name, "recipe": {k: v for k, v in stage.items() if k not in ("bits_per_tensor", "optimize")},
             "bytes": sum(f.stat().st_size for f in a.graph.parent.glob(a.graph.name + "*")), **m,
             "decode_ms": decode_ms(a.graph, chunks[0]), "build_s": None, "eval_s": time.time() - t0}
        save_result(cache, r)
        print(f"{a.graph_name}: KL {m['kl_mean']:.4g} top-1 {m['top1']:.2%} PPL ratio {m['ppl_ratio']:.4f}")
    for name in names:
        measure(a.export, cache, name, chunks, ref, calib, a.calibration_windows)
    if a.report:
        notes = (ROOT / "benchmarks" / "QUANT_NOTES.md")
        caches = [CACHE / m for m in MODELS if (CACHE / m / "results.json").is_file()]
        report(caches, ROOT / "benchmarks" / "QUANT.md", ROOT / "benchmarks" / "quant_quality.png",
               notes.read_text() if notes.is_file() else "")
        summary(caches, ROOT / "benchmarks" / "QUANT_SUMMARY.md")


if __name__ == "__main__":
    main()
