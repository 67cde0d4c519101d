"""Prefix caching in `onnxgen serve`: 16 streaming clients whose prompts share one long system prompt, with the
cache off (--prefix-cache-gb 0) and on, side by side.

    python benchmarks/prefix_cache.py EXPORT [--system-tokens 512] [--clients 16] [--rounds 3]

For each setting, starts `onnxgen serve EXPORT` on a free 127.0.0.1 port, warms it with one short request that
shares nothing with the system prompt (the cache starts empty), then each client sends --rounds streaming
/v1/completions back to back: the system prompt's ids, then a few ids of its own (a different question per
request). Reports the median time to first token, the completion tokens/s over the wall time, and the server's
/health prefix-cache counters. Writes benchmarks/PREFIX_CACHE.md and benchmarks/prefix_cache_EXPORT.png.
Where the model's context cannot hold --system-tokens plus a question and --max-tokens, the system prompt is
cut to what fits, and the note says so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import ROOT, free_port, machine, one_request, wait_up  # noqa: E402

SYSTEM_SOURCE = Path(json.__file__).with_name("decoder.py")  # any long text: Python's JSON decoder


def run(args, name: str, gb: float, system: list[int], questions: list[list[int]]) -> dict:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(args.export), "--host", "127.0.0.1",
                               "--port", str(port), "--model-name", name, "--max-batch", str(args.clients),
                               "--max-queue", "64", "--threads", str(args.threads), "--variant", args.variant,
                               "--prefix-cache-gb", str(gb)], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        wait_up(server, port)
        asyncio.run(one_request(port, name, questions[0], 4, 0))  # warm up: shares nothing with the system prompt
        results: list[dict] = []

        async def client(i: int):
            for j in range(args.rounds):
                q = questions[(i * args.rounds + j) % len(questions)]
                results.append(await one_request(port, name, system + q, args.max_tokens, 1000 * i + j))

        async def everyone():
            await asyncio.gather(*(client(i) for i in range(args.clients)))

        t0 = time.perf_counter()
        asyncio.run(everyone())
        wall = time.perf_counter() - t0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
            health = json.loads(r.read())
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    ok = [r for r in results if r["ok"]]
    ttft = np.array([r["ttft"] for r in ok]) * 1000
    return {"gb": gb, "requests": len(ok), "failed": len(results) - len(ok), "seconds": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": float(np.median(ttft)),
            "ttft_p90": float(np.percentile(ttft, 90)), "cache": health.get("prefix_cache")}


def label(row: dict) -> str:
    return "off" if row["gb"] == 0 else f"{row['gb']:g} GB"


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"cache {label(r)}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.bar(labels, [r["ttft_p50"] for r in rows], color=["#999", "#37c"])
    a.set(ylabel="ms", title="median time to first token")
    b.bar(labels, [r["tok_s"] for r in rows], color=["#999", "#37c"])
    b.set(ylabel="completion tokens/s", title="throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--system-tokens", type=int, default=512)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="Requests each client sends, back to back.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--gb", type=float, default=1.0, help="--prefix-cache-gb of the run with the cache on.")
    p.add_argument("--variant", default="fp32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--note", default="", help="A line for the result (e.g. how the export was made).")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "PREFIX_CACHE.md")
    args = p.parse_args()
    from pipeline.exports import read_config
    from pipeline.tokenizer import prompt_tokenizer

    name = args.export.resolve().name
    tok, context = prompt_tokenizer(args.export), read_config(args.export).context
    questions = [tok.encode(f"\n# Question {i}: what does line {3 * i + 1} do?\n",
                            add_special_tokens=False).ids for i in range(64)]
    longest = max(len(q) for q in questions)
    fits = context - longest - args.max_tokens - 1
    system = tok.encode(SYSTEM_SOURCE.read_text(), add_special_tokens=False).ids[:min(args.system_tokens, fits)]
    cut = "" if len(system) == args.system_tokens else (
        f" (cut from {args.system_tokens}: the model's context is {context} tokens)")
    rows = []
    for gb in (0.0, args.gb):
        rows.append(run(args, name, gb, system, questions))
        r = rows[-1]
        print(f"prefix cache {gb:g} GB: ttft p50 {r['ttft_p50']:.1f} p90 {r['ttft_p90']:.1f} ms, "
              f"{r['tok_s']:.0f} tok/s, "
              f"{r['requests']} requests, {r['failed']} failed, cache {r['cache']}", flush=True)
    off, on = rows
    png = args.out.parent / f"prefix_cache_{name}.png"
    chart(rows, png, f"{name}: {args.clients} clients, a {len(system)}-token shared system prompt")
    gain = off["ttft_p50"] / on["ttft_p50"]
    table = "\n".join(f"| {label(r)} | {r['ttft_p50']:.1f} | "
                      f"{r['ttft_p90']:.1f} | {r['tok_s']:,.0f} | {r['requests']} | {r['failed']} | "
                      f"{(r['cache'] or {}).get('hits', '-')} | {(r['cache'] or {}).get('hit_tokens', '-')} |"
                      for r in rows)
    c = read_config(args.export)
    args.out.write_text(f"""# Prefix caching in onnxgen serve

Written by `python benchmarks/prefix_cache.py {args.export} --system-tokens {args.system_tokens} --clients \
{args.clients} --rounds {args.rounds} --max-tokens {args.max_tokens}`. {args.note}

- model: `{name}`, {c.layers} layers, {c.heads} heads ({c.kv_heads} kv), {c.hidden} wide, context {c.context}; fused \
{args.variant} graph
- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
{machine()}
- load: {args.clients} streaming clients, each sending {args.rounds} /v1/completions back to back: a {len(system)}-token \
system prompt{cut} shared by all, then a question of {min(len(q) for q in questions)}-{longest} tokens of its own; \
max_tokens {args.max_tokens}, temperature 0.8, a seed per request. Server: `onnxgen serve --max-batch {args.clients} \
--threads {args.threads} --prefix-cache-gb X`, warmed by one short request that shares nothing with the system prompt, so the run with the cache on starts with it empty (its first request prefills the system prompt).

| prefix cache | TTFT p50, ms | TTFT p90, ms | completion tokens/s | requests | failed | cache hits | tokens copied |
| --- | --- | --- | --- | --- | --- | --- | --- |
{table}

The median time to first token is {gain:.1f}x shorter with the cache (the goal is 3x or more: \
{'met' if gain >= 3 else 'missed'}); throughput {on['tok_s'] / off['tok_s']:.2f}x.

![prefix cache](prefix_cache_{name}.png)
""")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
