"""Hybrid state against attention only: prefill of a 512-token prompt (ms) and decode tok/s at batch 1, for
decoders of the same width whose mixing layers are LFM2's short convolutions, Qwen3.5's Gated DeltaNet or
Granite 4's Mamba-2 beside a few attention layers, and a Llama-shaped attention-only one.

    python benchmarks/hybrid.py [--rounds 5] [--tokens 64] [--prompt 512]   -> benchmarks/HYBRID.md, hybrid.json, hybrid.png

Random-init weights (speed does not depend on the values), our decoder (model/decoder.py) as `export --hf`
builds each family, hidden 512, 8 layers, 8 heads (4 KV), SwiGLU 1536 wide, a 32k vocabulary:
  - attention: every layer full attention (Llama);
  - lfm2: conv, conv, attention repeated (kernel 3): its state past_conv (hidden x 2) a conv layer;
  - qwen3_5: linear, linear, linear, attention (2 key heads, 4 value heads of 64 + 128 wide, kernel 4);
  - granite4: mamba, mamba, mamba, attention (8 heads of 64, state 64, 1 group, kernel 4), no experts.
The plain graph, as ONNX Runtime runs it (the state layers are ONNX Runtime's CausalConvWithState,
LinearAttention and GatedDeltaNet nodes, so a prefill is one call). Rounds interleave the models; medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = dict(vocab_size=32000, n_ctx=4096, n_layer=8, n_head=8, n_kv_head=4, n_embd=512, n_inner=1536,
            norm="rmsnorm", positional="rope", qkv_bias=False, out_bias=False, activation="silu", gated=True,
            mlp_bias=False, tied=False)
A, F = "full_attention", "full_attention"
MODELS = {
    "attention": {},
    "lfm2": dict(layer_types=("conv", "conv", A) * 2 + ("conv", A), conv_kernel=3),
    "qwen3_5": dict(layer_types=("linear_attention",) * 3 + (F,) + ("linear_attention",) * 3 + (F,),
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64,
                    linear_value_head_dim=128, linear_conv_kernel_dim=4, attn_output_gate=True),
    "granite4": dict(layer_types=("mamba",) * 3 + (A,) + ("mamba",) * 3 + (A,), mamba_heads=8, mamba_head_dim=64,
                     mamba_groups=1, mamba_state=64, mamba_conv=4),
}


def build(work: Path) -> dict[str, Path]:
    import torch

    from pipeline.convert.export import export_graph
    from pipeline.model.decoder import Decoder, DecoderConfig

    graphs = {}
    for name, extra in MODELS.items():
        torch.manual_seed(0)
        model = Decoder(DecoderConfig(**BASE, **extra)).eval()
        (work / name).mkdir()
        graphs[name] = work / name / "model.onnx"
        export_graph(model, graphs[name])
    return graphs


def _feed_cache(session, batch: int) -> dict:
    """Zeros for every cache input: K/V of 0 positions, each state at its fixed shape."""
    from pipeline.run.lm import _ORT_TO_NUMPY

    feed = {}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            shape = [batch] + [0 if isinstance(d, str) else d for d in i.shape[1:]]
            feed[i.name] = np.zeros(shape, _ORT_TO_NUMPY[i.type])
    return feed


def run(session, prompt: int, tokens: int) -> tuple[float, float]:
    """(prefill ms, decode tok/s) of one greedy generation."""
    from pipeline.exports import present_of

    rng = np.random.default_rng(0)
    names = [o.name for o in session.get_outputs()]
    feed = {"input_ids": rng.integers(0, BASE["vocab_size"], (1, prompt)),
            "attention_mask": np.ones((1, prompt), np.int64), "position_ids": np.arange(prompt)[None],
            **_feed_cache(session, 1)}
    pasts = [n for n in feed if n.startswith("past")]
    t0 = time.perf_counter()
    out = dict(zip(names, session.run(None, feed)))
    prefill = (time.perf_counter() - t0) * 1e3
    n = prompt
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = out["logits"][:, -1].argmax(-1)[:, None]
        feed = {"input_ids": nxt, "attention_mask": np.ones((1, n + 1), np.int64), "position_ids": np.array([[n]]),
                **{p: out[present_of(p)] for p in pasts}}
        out = dict(zip(names, session.run(None, feed)))
        n += 1
    return prefill, tokens / (time.perf_counter() - t0)


def main():
    from pipeline.check.bench import interleaved, machine, versions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    out_dir = ROOT / "benchmarks"
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxgen-hybrid-") as tmp:
        graphs = build(Path(tmp))
        for threads in (1, 2):
            samples = interleaved(graphs, threads, args.rounds, lambda s: run(s, args.prompt, args.tokens),
                                  lambda s: run(s, 16, 2))
            results[threads] = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
                                for k, v in samples.items()}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    (out_dir / "hybrid.json").write_text(json.dumps(
        {"models": {k: {**BASE, **v} for k, v in MODELS.items()}, "rounds": args.rounds, "tokens": args.tokens,
         "prompt": args.prompt, "results": {str(t): r for t, r in results.items()}, "machine": machine(),
         "versions": versions(), "when": when, "load_average": load}, indent=1, default=list))
    lines = ["# Hybrid state against attention only", "",
             f"`python benchmarks/hybrid.py` ({when}, {machine()}; {args.rounds} interleaved rounds, medians; a "
             f"{args.prompt}-token prompt, then {args.tokens} decode steps, batch 1, greedy, the plain graph; load "
             f"average {load:.1f} when it ended: the machine is shared, read the ratios). Random-init decoders, "
             "hidden 512, 8 layers (see the script's docstring for each layout).", "",
             "| model | prefill ms, 1 thread | decode tok/s, 1 thread | prefill ms, 2 threads | decode tok/s, 2 threads "
             "| decode vs attention, 1 / 2 threads |", "| --- | --- | --- | --- | --- | --- |"]
    for k in MODELS:
        r1, r2 = results[1][k], results[2][k]
        lines.append(f"| {k} | {r1[0]:.0f} | {r1[1]:.1f} | {r2[0]:.0f} | {r2[1]:.1f} | "
                     f"{r1[1] / results[1]['attention'][1]:.2f}x / {r2[1] / results[2]['attention'][1]:.2f}x |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
    (out_dir / "HYBRID.md").write_text("\n".join(lines))
    chart(results, out_dir / "hybrid.png")
    print("\n".join(lines))


def chart(results, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(MODELS)
    x = np.arange(len(keys))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for j, t in enumerate((1, 2)):
        label = f"{t} thread{'s' if t > 1 else ''}"
        a.bar(x + (j - 0.5) * 0.4, [results[t][k][0] for k in keys], 0.4, label=label)
        b.bar(x + (j - 0.5) * 0.4, [results[t][k][1] for k in keys], 0.4, label=label)
    a.set_xticks(x, keys)
    a.set_ylabel("prefill of the prompt (ms)")
    b.set_xticks(x, keys)
    b.set_ylabel("decode tok/s, batch 1")
    a.legend()
    fig.suptitle("Hybrid state layers against attention only (hidden 512, 8 layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
