"""Routed experts as one MoE/QMoE node a layer against every expert on every token (the dense graph a
plain-ops exporter writes): decode tok/s at batch 1 and the graph's size, fp32 and int4.

    python benchmarks/moe.py [--rounds 5] [--tokens 64]      -> benchmarks/MOE.md, moe.json, moe.png

The model is random-init (speed and size do not depend on the values): 8 layers, hidden 512, 8 heads (4 KV),
8 SwiGLU experts 1024 wide, top-2, a 32k vocabulary (Mixtral's), our decoder (model/decoder.py) as
`export --hf` builds a Mixtral. Four graphs:
  - moe fp32: what onnxgen exports (com.microsoft MoE, the chosen experts only);
  - dense fp32: the same weights with Experts.dense (each expert's MatMuls on every token, weighted by a
    scatter of the router's choice: standard ops only);
  - moe int4: quantize's int4 (QMoE, 4-bit blocks of 32; attention and head MatMulNBits, RTN);
  - dense int4: MatMulNBits on every expert MatMul, same recipe.
Decode: a 32-token prompt, then --tokens steps of one token through the plain graph's cache, greedy; the rate
is steps / time of the steps (the prefill excluded). Rounds interleave the four graphs; medians.
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

SHAPE = dict(vocab_size=32000, n_ctx=4096, n_layer=8, n_head=8, n_kv_head=4, n_embd=512, n_inner=1024,
             norm="rmsnorm", positional="rope", qkv_bias=False, out_bias=False, activation="silu", gated=True,
             mlp_bias=False, tied=False, n_experts=8, n_experts_per_tok=2)


def build(work: Path) -> dict[str, Path]:
    import torch

    from pipeline.convert.export import export_graph
    from pipeline.convert.optimize import optimize
    from pipeline.convert.quantize.recipe import Recipe
    from pipeline.convert.quantize.variants import quantize_weights
    from pipeline.model.decoder import Decoder, DecoderConfig, Experts

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**SHAPE)).eval()
    graphs = {}
    for kind in ("moe", "dense"):
        for m in model.modules():
            if isinstance(m, Experts):
                m.dense = kind == "dense"
        (work / kind).mkdir()
        graphs[f"{kind} fp32"] = work / kind / "model.onnx"
        export_graph(model, graphs[f"{kind} fp32"])
        graphs[f"{kind} int4"] = work / kind / "model_q4.onnx"
        # as the quantize stage does: onnxruntime.transformers' fusions first (convert/optimize.py)
        optimize(graphs[f"{kind} fp32"], work / kind / "optimized.onnx", SHAPE["n_head"], SHAPE["n_embd"],
                 norm="rmsnorm")
        quantize_weights(work / kind / "optimized.onnx", graphs[f"{kind} int4"],
                         Recipe(bits=4, method="rtn", block_size=32, eight_bit=(), head="int8"))
    return graphs


def graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def decode_rate(session, tokens: int, prompt: int = 32) -> float:
    c = SHAPE
    head_dim = c["n_embd"] // c["n_head"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c["vocab_size"], (1, prompt))
    feed = {"input_ids": ids, "attention_mask": np.ones((1, prompt), np.int64),
            "position_ids": np.arange(prompt)[None]}
    for i in range(c["n_layer"]):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, c["n_kv_head"], 0, head_dim), np.float32)
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feed)))
    n = prompt
    t0 = time.perf_counter()
    for _ in range(tokens):
        nxt = out["logits"][:, -1].argmax(-1)[:, None]
        feed = {"input_ids": nxt, "attention_mask": np.ones((1, n + 1), np.int64), "position_ids": np.array([[n]])}
        feed.update({k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")})
        out = dict(zip(names, session.run(None, feed)))
        n += 1
    return tokens / (time.perf_counter() - t0)


def main():
    from pipeline.check.bench import interleaved, machine, versions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    out_dir = ROOT / "benchmarks"
    with tempfile.TemporaryDirectory(prefix="onnxgen-moe-") as tmp:
        graphs = build(Path(tmp))
        sizes = {k: graph_bytes(p) for k, p in graphs.items()}
        ops = {}
        import onnx
        for k, p in graphs.items():
            types = [n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node]
            ops[k] = {t: types.count(t) for t in ("MoE", "QMoE", "MatMul", "MatMulNBits") if t in types}
        rates = {}
        for threads in (1, 2):
            samples = interleaved(graphs, threads, args.rounds, lambda s: decode_rate(s, args.tokens),
                                  lambda s: decode_rate(s, 4))
            rates[threads] = {k: statistics.median(v) for k, v in samples.items()}
    result = {"shape": SHAPE, "rounds": args.rounds, "tokens": args.tokens, "bytes": sizes, "ops": ops,
              "tok_s": {str(t): r for t, r in rates.items()}, "machine": machine(), "versions": versions(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg()[0]}
    (out_dir / "moe.json").write_text(json.dumps(result, indent=1))
    lines = ["# Routed experts: one MoE node against every expert on every token", "",
             f"`python benchmarks/moe.py` ({result['when']}, {result['machine']}; {args.rounds} interleaved rounds, "
             f"medians; {args.tokens} decode steps after a 32-token prompt, batch 1, greedy; load average "
             f"{result['load_average']:.1f} when it ended: the machine is shared, read the ratios). A random-init "
             "Mixtral-shaped decoder: 8 layers, hidden 512, 8 heads (4 KV), 8 SwiGLU experts 1024 wide, top-2, "
             "32k vocabulary.", "",
             "| graph | size | nodes | tok/s, 1 thread | tok/s, 2 threads | vs dense, 1 thread | vs dense, 2 threads |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in graphs:
        base = k.replace("moe", "dense")
        nodes = ", ".join(f"{n} {c}" for n, c in ops[k].items())
        lines.append(f"| {k} | {sizes[k] / 1e6:.1f} MB | {nodes} | {rates[1][k]:.1f} | {rates[2][k]:.1f} | "
                     f"{rates[1][k] / rates[1][base]:.2f}x | {rates[2][k] / rates[2][base]:.2f}x |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), ""]
    (out_dir / "MOE.md").write_text("\n".join(lines))
    chart(rates, sizes, out_dir / "moe.png")
    print("\n".join(lines))


def chart(rates, sizes, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sizes)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(keys))
    for j, t in enumerate((1, 2)):
        a.bar(x + (j - 0.5) * 0.4, [rates[t][k] for k in keys], 0.4, label=f"{t} thread{'s' if t > 1 else ''}")
    a.set_xticks(x, keys, rotation=15)
    a.set_ylabel("decode tok/s, batch 1")
    a.legend()
    b.bar(x, [sizes[k] / 1e6 for k in keys], color="gray")
    b.set_xticks(x, keys, rotation=15)
    b.set_ylabel("graph size (MB)")
    fig.suptitle("8 experts, top-2: the MoE node against a dense all-experts graph")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
