"""Load on `onnxgen serve`: 1, 4, 16 and 64 concurrent streaming clients on loopback.

    python benchmarks/serve_load.py EXPORT [--seconds 20] [--max-tokens 64]

Starts `onnxgen serve EXPORT` on a free 127.0.0.1 port (never anything else), then for each level of
concurrency runs that many clients, each sending streaming /v1/completions requests back to back for
--seconds. Reports aggregate completion tokens/s (usage's completion_tokens over the wall time from the
first request to the last answer), p50/p99 time to first token and p50/p99 time per output token
(per request: from its first to its last streamed chunk over its tokens - 1). Writes the section for
EXPORT in benchmarks/SERVE.md (replacing an older one) and benchmarks/serve_EXPORT.png.

The clients speak HTTP/1.1 over asyncio streams (no HTTP library: the clients share the machine with the
server, so they should cost it as little as possible).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Parser(object):\n    def __init__(self, ", "    for line in lines:\n",
           "from email import message\n", "def parse_args(argv=None):\n    ", "    try:\n        return self."]


def wait_up(server: subprocess.Popen, port: int) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert server.poll() is None, server.stderr.read().decode()
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(port: int, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                       "seed": seed, "stream": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    status = (await reader.readline()).split()[1]
    times, tokens = [], 0
    while line := await reader.readline():
        if not line.startswith(b"data: "):
            continue
        if line.startswith(b"data: [DONE]"):
            break
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk.get("choices") and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
            times.append(time.perf_counter())  # a piece of text, or the end (an answer may have no text)
    writer.close()
    if status != b"200" or not times:
        return {"ok": False, "status": status.decode()}
    per_token = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None
    return {"ok": True, "ttft": times[0] - t0, "per_token": per_token, "tokens": tokens}


async def level(port: int, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    deadline = time.perf_counter() + seconds
    results: list[dict] = []

    async def client(i: int):
        n = 0
        while time.perf_counter() < deadline:
            results.append(await one_request(port, model, PROMPTS[(i + n) % len(PROMPTS)], max_tokens, 1000 * i + n))
            n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    if len(ok) < len(results):
        print(f"  {clients} clients: failed requests' statuses: {sorted(r['status'] for r in results if not r['ok'])}")
    ttft = np.array([r["ttft"] for r in ok]) * 1000
    tpot = np.array([r["per_token"] for r in ok if r["per_token"] is not None]) * 1000
    return {"clients": clients, "requests": len(ok), "failed": len(results) - len(ok),
            "tokens": sum(r["tokens"] for r in ok), "seconds": wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "tpot_p50": float(np.percentile(tpot, 50)), "tpot_p99": float(np.percentile(tpot, 99))}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    from importlib import metadata
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("onnxruntime", "starlette", "uvicorn", "numpy"))
    load = os.getloadavg()
    return (f"- machine: {cpu}, {os.cpu_count()} logical cores, Linux {platform.release()}; load average "
            f"{load[0]:.1f} when the run started (the machine is shared)\n- versions: python {platform.python_version()}, "
            f"{versions}")


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["clients"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(c, [r["tok_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="concurrent streaming clients", ylabel="aggregate tokens/s", title=title)
    a.set_xticks(c, [str(x) for x in c])
    for key, style in (("ttft_p50", "o-"), ("ttft_p99", "o--"), ("tpot_p50", "s-"), ("tpot_p99", "s--")):
        b.plot(c, [r[key] for r in rows], style, label=key.replace("_", " "))
    b.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="ms",
          title="time to first token, time per output token")
    b.set_xticks(c, [str(x) for x in c])
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_section(out: Path, key: str, text: str) -> None:
    """Replace the section whose heading starts with `key` (or add it), keeping the others."""
    head = "# onnxgen serve under load\n\nWritten by `python benchmarks/serve_load.py EXPORT`: one section per export.\n"
    old = out.read_text() if out.is_file() else head
    sections = re.split(r"(?m)^(?=## )", old)
    kept = [s for s in sections[1:] if not s.startswith(key)]
    out.write_text(sections[0].rstrip() + "\n\n" + "".join(s.rstrip() + "\n\n" for s in kept) + text.rstrip() + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--variant", default="fp32", help="The variant the server runs (its fused twin).")
    p.add_argument("--threads", type=int, default=0, help="The server's ONNX Runtime intra-op threads [all cores].")
    p.add_argument("--note", default="", help="A line for the section (e.g. how the model was trained).")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "SERVE.md")
    args = p.parse_args()
    name, port = args.export.resolve().name, free_port()
    server = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(args.export), "--host", "127.0.0.1",
                               "--port", str(port), "--model-name", name, "--max-batch", str(args.max_batch),
                               "--max-queue", "64", "--threads", str(args.threads),
                               "--variant", args.variant], cwd=ROOT, stderr=subprocess.PIPE)
    try:
        wait_up(server, port)
        asyncio.run(level(port, name, 2, 2.0, args.max_tokens))  # warm up
        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            rows.append(asyncio.run(level(port, name, clients, args.seconds, args.max_tokens)))
            r = rows[-1]
            print(f"{clients:3d} clients: {r['tok_s']:7.0f} tok/s, ttft p50 {r['ttft_p50']:.1f} p99 {r['ttft_p99']:.1f} ms, "
                  f"per token p50 {r['tpot_p50']:.2f} p99 {r['tpot_p99']:.2f} ms, {r['requests']} requests, "
                  f"{r['failed']} failed", flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    from pipeline.exports import read_config

    c = read_config(args.export)
    shape = f"{c.layers} layers, {c.heads} heads ({c.kv_heads} kv), {c.hidden} wide, context {c.context}"
    png = args.out.parent / f"serve_{name}.png"
    chart(rows, png, f"{name}: onnxgen serve, fused {args.variant}")
    base = rows[0]["tok_s"]
    at16 = next((r["tok_s"] / base for r in rows if r["clients"] == 16), None)
    want = 6 if args.variant == "fp32" else 3  # issue 14: 6x on the trained small, 3x on SmolLM2 int4
    goal = "" if at16 is None else (f"16 clients give {at16:.1f}x the tokens/s of 1 client (the goal is {want}x or more: "
                                    f"{'met' if at16 >= want else 'missed'}).")
    table = "\n".join(
        f"| {r['clients']} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.1f}x | {r['ttft_p50']:.1f} | {r['ttft_p99']:.1f} | "
        f"{r['tpot_p50']:.2f} | {r['tpot_p99']:.2f} | {r['requests']} | {r['failed']} |" for r in rows)
    write_section(args.out, f"## {name}: load", f"""## {name}: load, {shape}, fused {args.variant} graph

{args.note}

{machine()}
- server: `onnxgen serve --max-batch {args.max_batch} --max-queue 64 --threads {args.threads}`, its own process; clients: one asyncio
  process on the same machine, streaming /v1/completions back to back for {args.seconds:g} s per level,
  prompts of 6-13 tokens, max_tokens {args.max_tokens}, temperature 0.8 with a seed per request (a request
  may end early at the end-of-text token)

| clients | tokens/s | vs 1 client | TTFT p50, ms | TTFT p99, ms | per token p50, ms | per token p99, ms | requests | failed |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{table}

{goal}

![load](serve_{name}.png)
""")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
