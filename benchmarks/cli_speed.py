"""`onnxgen run` as a user runs it (the CLI, streaming to a pipe) against onnxruntime-genai on the same export.

    python benchmarks/cli_speed.py exports/default [--rounds 5] [--threads 1 2]
        -> benchmarks/CLI.md, benchmarks/cli_speed.png

Issue 12's measurement for the trained `small`. Every run is a fresh process, as a user's command is:
  - onnxgen: `onnxgen run EXPORT PROMPT --no-echo --stats --threads T [--variant V]` (its fused twin, as run
    picks it, and the export's sampling defaults unless the mode is greedy);
  - onnxruntime-genai: this file as a child (`--genai-child`), the export's own genai_config.json (only the
    graph file and the thread count changed), streaming with genai's tokenizer stream, each piece printed and
    flushed as onnxgen's are. "as shipped" is the graph the export's genai_config.json names (model.onnx);
    "same graph" runs onnxgen's fused twin, so the difference is the loop alone.
The parent timestamps each chunk as it arrives on the pipe: decode rate = (N - 1) / (t(last) - t(first)), N the
tokens the engine reports generating (it may stop early at end-of-text); start-up = launch to first piece.
Two modes: "default" decodes as each engine reads the export (generation_config.json: the small samples with
temperature 0.8, top-k 50, top-p 0.95; genai_config.json carries the same since this change), with seed r in
round r for both; "greedy" forces greedy decoding in both. Rounds are interleaved; medians reported.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "def parse_args(argv):\n    "
VARIANTS = ("fp32", "int4")


def genai_child(args) -> None:
    """Generate with onnxruntime-genai, printing pieces as they come; 'N tokens' on stderr at the end."""
    import numpy as np
    import onnxruntime_genai as og

    from pipeline.check.bench import genai_config

    folder = Path(args.export)
    where = Path(tempfile.mkdtemp(prefix="onnxgen-genai-"))
    for f in folder.iterdir():
        if f.name != "genai_config.json":
            (where / f.name).symlink_to(f.resolve())
    (where / "genai_config.json").write_text(json.dumps(genai_config(folder, args.file, args.shared, args.threads)))
    model = og.Model(og.Config(str(where)))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(args.prompt)
    params = og.GeneratorParams(model)
    options = {"max_length": len(ids) + args.tokens, "random_seed": args.seed}
    if args.greedy:
        options["do_sample"] = False
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    stream, n = tokenizer.create_stream(), 0
    while not generator.is_done():
        generator.generate_next_token()
        n += 1
        piece = stream.decode(generator.get_next_tokens()[0])
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    print(f"{n} tokens", file=sys.stderr)


def timed(cmd: list[str]) -> dict:
    """Run cmd; timestamps of its stdout chunks, its stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    stamps = []
    while chunk := os.read(proc.stdout.fileno(), 65536):
        if chunk.strip():
            stamps.append(time.perf_counter())
    err = proc.stderr.read().decode()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    found = re.search(r"(\d+) tokens", err)
    n = int(found.group(1))
    return {"n": n, "startup": stamps[0] - start, "rate": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0}


def engines(export: Path, tokens: int) -> list[tuple[str, str, callable]]:
    """(label, variant, command builder(threads, seed, greedy))."""
    from pipeline.exports import fused_path, variant_path

    onnxgen = str(Path(sys.executable).with_name("onnxgen"))
    out = []
    for v in VARIANTS:
        if not variant_path(export, v).is_file():
            continue
        out.append((f"onnxgen run --variant {v}", v, lambda t, s, g, v=v: [
            onnxgen, "run", str(export), PROMPT, "--no-echo", "--stats", "--threads", str(t), "--variant", v,
            "--max-new-tokens", str(tokens), "--seed", str(s)] + (["--temperature", "0"] if g else [])))
        graphs = [(variant_path(export, v).name, False, "as shipped" if v == "fp32" else "plain graph")]
        if fused_path(export, v).is_file():
            graphs.append((fused_path(export, v).name, True, "onnxgen's fused graph"))
        for file, shared, what in graphs:
            out.append((f"onnxruntime-genai, {file} ({what})", v, lambda t, s, g, file=file, shared=shared: [
                sys.executable, __file__, str(export), "--genai-child", "--file", file,
                "--threads", str(t), "--tokens", str(tokens), "--seed", str(s), "--prompt", PROMPT]
                + (["--shared"] if shared else []) + (["--greedy"] if g else [])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", nargs="?", default="exports/default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", default="benchmarks/CLI.md")
    # the genai child
    p.add_argument("--genai-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--greedy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--prompt", default=PROMPT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.genai_child:
        args.threads = args.threads[0]
        return genai_child(args)

    from pipeline.check.bench import machine, versions

    export = Path(args.export).resolve()
    todo = engines(export, args.tokens)
    modes = ("default", "greedy")
    runs: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for t in args.threads:
            for mode in modes:
                for label, _, cmd in todo:
                    runs.setdefault((label, t, mode), []).append(timed(cmd(t, r, mode == "greedy")))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("n", "startup", "rate")} for k, v in runs.items()}
    text = report(export, args, todo, modes, med, runs, machine(), versions())
    Path(args.out).write_text(text)
    chart(todo, args.threads, modes, med, Path(args.out).with_name("cli_speed.png"))
    print(text)


def report(export, args, todo, modes, med, runs, machine_line, vers) -> str:
    shipped = next(label for label, v, _ in todo if "as shipped" in label)
    lines = [f"# `onnxgen run` against onnxruntime-genai on the same export: {export.name}", "",
             "Written by `python benchmarks/cli_speed.py` (its docstring says how). Machine: "
             f"{machine_line}. Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".",
             f"Prompt {PROMPT!r}, {args.tokens} new tokens at most, batch 1; {args.rounds} interleaved rounds, "
             "medians; every run a fresh process streaming to a pipe.", ""]
    for mode in modes:
        lines += [f"## {mode} decoding" + (" (the export's generation_config.json)" if mode == "default" else ""), "",
                  "| engine | variant | " + " | ".join(f"{t} thread{'s' * (t > 1)}: tok/s | vs genai as shipped | tokens "
                                                          f"| start-up s" for t in args.threads) + " |",
                  "|---|---|" + "---|---|---|---|" * len(args.threads)]
        for label, v, _ in todo:
            cells = []
            for t in args.threads:
                m, base = med[(label, t, mode)], med[(shipped, t, mode)]
                cells.append(f"{m['rate']:,.0f} | {m['rate'] / base['rate']:.2f}x | {m['n']:.0f} | {m['startup']:.2f}")
            lines.append(f"| {label} | {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["How to read it: \"as shipped\" is what a genai user of this export gets (genai_config.json names the",
              "plain contract graph); \"onnxgen's fused graph\" is genai's C++ loop on the graph `onnxgen run` uses, so",
              "onnxgen's row against it is the cost of a Python loop (sampling included). `onnxgen run` uses every core",
              "unless --threads says otherwise: the 2-thread columns are what a user gets by default. The machine is shared:",
              "compare rows within a column; per-round rates below show the spread.", ""]
    lines += ["Per-round decode rates (tok/s):", ""]
    for (label, t, mode), v in runs.items():
        lines.append(f"- {label}, {t} thread(s), {mode}: " + ", ".join(f"{x['rate']:,.0f}" for x in v))
    return "\n".join(lines) + "\n"


def chart(todo, threads, modes, med, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 0.5 * len(todo) + 1.8), sharey=True)
    for ax, mode in zip(axes, modes):
        h = 0.8 / len(threads)
        for i, t in enumerate(threads):
            ys = [j + i * h for j in range(len(todo))]
            ax.barh(ys, [med[(label, t, mode)]["rate"] for label, _, _ in todo], height=h, label=f"{t} thread(s)")
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(todo))], [f"{label} [{v}]" for label, v, _ in todo],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("decode tok/s (median)")
        ax.set_title(f"{mode} decoding")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
