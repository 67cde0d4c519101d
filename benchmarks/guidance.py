"""What a constrained token costs: llguidance's mask per token at batch 1 and 16 on a 49k vocabulary, and
decode tok/s with and without a JSON schema.

    python benchmarks/guidance.py EXPORT [--rounds 7] [--tokenizer tokenizer.json]
    python benchmarks/guidance.py --random-smollm2 .cache/guidance/smollm2-random    # SmolLM2-135M's shape
        -> benchmarks/GUIDANCE.md, benchmarks/guidance.png

1. Mask cost (no model): a 49,152-token byte-level BPE (SmolLM2's size; trained here on the standard
   library when no --tokenizer is given, ~1 min, cached under .cache/) walks the tokens of documents that
   match a tool-call-like schema; per token it times what run/guidance.py's Guides do between two steps:
   computing the mask (llguidance), applying it to (B, V) logits (unpackbits + where) and consuming the pick.
   Batch 16 is 16 rows, each its own matcher at its own position, masks filled one after another.
2. Decode (EXPORT, fused graph, batch 1, greedy): tok/s free against under a JSON schema whose answer does not
   end within the budget (an array of at least 64 objects), the next mask computed while ONNX Runtime runs
   the step, as OnnxLM does it.
   Rate = (N - 1) / (t(N) - t(1)). Rounds interleave free and constrained; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "arguments": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city", "days", "unit", "tags"], "additionalProperties": False}},
    "required": ["name", "arguments"], "additionalProperties": False}
# for the decode rate, an answer longer than the budget (at least 64 objects): no early end
ENDLESS = {"type": "array", "minItems": 64, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                     "n": {"type": "integer", "minimum": 0, "maximum": 999}},
    "required": ["name", "n"], "additionalProperties": False}}
CITIES = ["Oslo", "Zürich", "San Francisco", "Ouagadougou", "Reykjavík", "München", "São Paulo", "Kyiv"]


def big_tokenizer(path: Path | None):
    from tokenizers import Tokenizer

    if path is not None:
        return Tokenizer.from_file(str(path))
    cached = ROOT / ".cache" / "guidance" / "bpe49152.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    import sysconfig

    from pipeline.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(errors="ignore") for p in sorted(stdlib.rglob("*.py"))]
    tok = train_tokenizer(docs, 49152)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(cached))
    return tok


def random_smollm2(out: Path, tok) -> Path:
    """SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, 49,152 tokens, tied head) with random
    weights and the 49k tokenizer, through `export --hf` and `fuse`: a step that costs what SmolLM2's does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.hf_import import export_hf

    if (out / "export" / "onnx").is_dir():
        return out / "export"
    eot = "<|endoftext|>"
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=tok.get_vocab_size(), max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=tok.token_to_id(eot),
                         eos_token_id=tok.token_to_id(eot))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot,
                            pad_token=eot).save_pretrained(out / "hf")
    export_hf(out / "hf", out / "export", force=True)
    fuse_export(out / "export", ["fp32"])
    return out / "export"


def documents(n: int) -> list[str]:
    return [json.dumps({"name": f"get_weather_{i}", "arguments": {
        "city": CITIES[i % len(CITIES)], "days": 3 + 7 * i, "unit": ["celsius", "fahrenheit"][i % 2],
        "tags": ["outdoor", f"trip {i}", "family"][: 1 + i % 3]}}, separators=(",", ":"), ensure_ascii=False)
        for i in range(n)]


def mask_cost(tok, batch: int, rounds: int) -> dict:
    """Median microseconds per step (all rows) for mask, apply and consume, over `rounds` walks."""
    from pipeline.run.guidance import Constraint, Guides, guidance_tokenizer

    V = tok.get_vocab_size()
    eos = [tok.token_to_id("<|endoftext|>") or 0]
    llt = guidance_tokenizer(tok, V, eos)
    c = Constraint.json_schema(SCHEMA)
    docs = [tok.encode(d, add_special_tokens=False).ids for d in documents(batch)]
    steps = min(len(d) for d in docs)
    logits = np.random.default_rng(0).normal(size=(batch, V)).astype(np.float32)
    per = {"mask": [], "apply": [], "consume": []}
    for _ in range(rounds):
        g = Guides(llt, batch, V)
        for b in range(batch):
            g.add(b, c)
        t = {"mask": 0.0, "apply": 0.0, "consume": 0.0}
        for s in range(steps):
            t0 = time.perf_counter()
            g._fill()
            g.ready = True
            t1 = time.perf_counter()
            g.apply(logits)
            t2 = time.perf_counter()
            for b in range(batch):
                g.consume(b, docs[b][s])
            t3 = time.perf_counter()
            t["mask"] += t1 - t0
            t["apply"] += t2 - t1
            t["consume"] += t3 - t2
        for k in per:
            per[k].append(t[k] / steps * 1e6)
    return {k: statistics.median(v) for k, v in per.items()} | {"steps": steps, "vocab": V}


def decode_rate(lm, constraint, tokens: int) -> tuple[float, float]:
    """(tok/s, CPU ms a token): the CPU time of this process (ONNX Runtime's threads and the mask's worker
    included) moves less than the wall clock when other jobs share the cores."""
    from pipeline.run.lm import Generation

    stamps, cpu = [], []
    result = Generation()
    for _ in lm.generate([lm.encode("[")], tokens, result=result, constraint=constraint, stop_at_eos=False):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), (cpu[-1] - cpu[0]) / (len(cpu) - 1) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, nargs="?", help="The model for the decode rates [--random-smollm2's].")
    p.add_argument("--random-smollm2", type=Path, default=None, metavar="DIR",
                   help="Make (once, in DIR) a random-weight model of SmolLM2-135M's shape with the 49k tokenizer.")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, default=None, help="A tokenizer.json of ~49k tokens [trained here].")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "GUIDANCE.md")
    args = p.parse_args()

    from pipeline.check.bench import machine, versions
    from pipeline.run.guidance import Constraint, Guides
    from pipeline.run.lm import OnnxLM

    load = [os.getloadavg()[0]]  # the machine is shared: its load is part of the result
    tok = big_tokenizer(args.tokenizer)
    command = f"--random-smollm2 {args.random_smollm2}" if args.random_smollm2 else str(args.export)
    if args.random_smollm2 is not None:
        args.export = random_smollm2(args.random_smollm2, tok)
    costs = {b: mask_cost(tok, b, args.rounds) for b in (1, 16)}
    lm = OnnxLM(args.export, fused="auto", threads=args.threads)
    tokens = min(args.tokens, lm.n_ctx - 2)
    c = Constraint.json_schema(ENDLESS)
    decode_rate(lm, None, 8), decode_rate(lm, c, 8)  # warm-up
    rates = {"free": [], "schema": [], "schema, no overlap": []}
    cpu = {k: [] for k in rates}
    for r in range(args.rounds):
        names = list(rates) if r % 2 == 0 else list(reversed(rates))
        for name in names:
            Guides.overlap = name != "schema, no overlap"
            rate, ms = decode_rate(lm, c if name != "free" else None, tokens)
            rates[name].append(rate)
            cpu[name].append(ms)
    Guides.overlap = True
    load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    lines = [
        "# Constrained decoding: what a constrained token costs", "",
        f"`python benchmarks/guidance.py {command} --rounds {args.rounds}`; {args.rounds} rounds, medians.", "",
        f"Machine: {machine()}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in {**versions(), "llguidance": _version("llguidance")}.items()) + ". "
        f"Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end ({os.cpu_count()} cores).", "",
        f"## Mask cost per step, {costs[1]['vocab']:,}-token vocabulary",
        "", "A JSON schema of a tool call, documents walked token by token (µs per step, all rows):", "",
        "| batch | mask (llguidance) | apply to logits | consume | total | per row |", "|---|---|---|---|---|---|"]
    for b, c_ in costs.items():
        total = c_["mask"] + c_["apply"] + c_["consume"]
        lines.append(f"| {b} | {c_['mask']:.0f} | {c_['apply']:.0f} | {c_['consume']:.0f} | {total:.0f} | "
                     f"{total / b:.0f} |")
    slowdown = med["free"] / med["schema"] - 1
    model = ("a random-weight model of SmolLM2-135M's shape" if args.random_smollm2 else args.export.name)
    lines += ["", f"## Decode, {model} ({'fused' if lm.fused else 'plain'}, vocabulary {lm.vocab_size:,}, "
              f"batch 1, greedy, {tokens} tokens)", "",
              "| | tok/s (median) | CPU ms a token (median) | tok/s, rounds |", "|---|---|---|---|"]
    for name, label in (("free", "free"), ("schema", "JSON schema"),
                        ("schema, no overlap", "JSON schema, mask computed after the step (no overlap)")):
        lines.append(f"| {label} | {med[name]:.1f} | {med_cpu[name]:.2f} | "
                     f"{', '.join(f'{x:.0f}' for x in rates[name])} |")
    lines += ["", f"A constrained token costs {slowdown * 100:+.1f}% wall time against a free one on this model "
              f"(step {1e3 / med['free']:.2f} ms; without the overlap "
              f"{(med['free'] / med['schema, no overlap'] - 1) * 100:+.1f}%), and "
              f"{(med_cpu['schema'] / med_cpu['free'] - 1) * 100:+.1f}% CPU time."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(costs, med, rates, args.out.with_name("guidance.png"))


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def plot(costs: dict, med: dict, rates: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    parts = ("mask", "apply", "consume")
    bottom = np.zeros(len(costs))
    for part in parts:
        values = np.array([costs[k][part] for k in costs])
        a.bar([f"batch {k}" for k in costs], values, bottom=bottom, label=part)
        bottom += values
    a.set_ylabel("µs per step (all rows)")
    a.set_title("llguidance mask cost, 49k vocabulary")
    a.legend()
    b.bar(["free", "JSON schema", "schema, no overlap"], [med[k] for k in rates],
          color=["tab:gray", "tab:blue", "tab:orange"])
    for i, k in enumerate(rates):
        b.scatter([i] * len(rates[k]), rates[k], color="black", s=8, zorder=3)
    b.set_ylabel("tok/s (median, dots: rounds)")
    b.set_title("decode, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
