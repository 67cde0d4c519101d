"""Peak memory and time of each stage, per model, against issue 36's budget (2 x the fp32 weights + 1.5 GB).

    python benchmarks/memory.py --model small=models/small --model smollm2=.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/memory.py --model gemma3=.cache/gemma3/hf --stages export,parity
        # -> benchmarks/MEMORY.md and benchmarks/memory.png (rows of earlier runs of other models are kept)

Each stage runs as `onnxgen` does for a user, in a child process; its peak resident memory is the largest sum
of RSS over the child and its own children, polled every 50 ms with psutil (what `/usr/bin/time -v` reports
for one process, here for the tree). A source is an onnxgen run folder, a transformers folder or a GGUF file;
its export goes to exports/bench-memory-NAME (removed at the end unless --keep).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("export", "quantize", "fuse", "parity", "run")
# `run`: the plain fp32 graph (every prompt position's logits: the runtime's worst case, prefilled in chunks)
# on a long prompt, the first 6,000 characters of the standard library's argparse.py (about 1,500 tokens)
PROMPT = Path(argparse.__file__).read_text()[:6000]
GB = 1e9


def peak_rss(cmd: list[str], timeout: float) -> tuple[float, float, int, str]:
    """(peak RSS of the process tree in bytes, seconds, exit code, the tail of its stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def poll():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, total)
            except psutil.Error:
                pass
            done.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        thread.join()
    return peak, time.perf_counter() - t0, proc.returncode, err[-2000:]


def fp32_weight_bytes(source: Path, export: Path) -> int:
    """The model's weights in fp32, the budget's unit: from the source's safetensors headers or GGUF tensor
    counts; for a run folder, the fp32 graph's size (model.onnx and its external data; a tied head counts
    twice there, which for the trained presets is small)."""
    from pipeline.model import families, gguf

    if source.suffix == ".gguf":
        return gguf.fp32_weight_bytes(source)
    if any(source.glob("*.safetensors")):
        return families.fp32_weight_bytes(source)
    return sum(p.stat().st_size for p in (export / "onnx").glob("model.onnx*"))


def commands(name: str, source: Path, export: Path, prompt: Path,
             no_memory_check: bool = False) -> dict[str, list[str]]:
    onnxgen = [sys.executable, "-m", "pipeline.cli"]
    if source.suffix == ".gguf":
        export_cmd = [*onnxgen, "export", "--gguf", str(source)]
    elif (source / "config.json").is_file() and "model_type" in json.loads((source / "config.json").read_text()):
        export_cmd = [*onnxgen, "export", "--hf", str(source)]
    else:
        export_cmd = [*onnxgen, "export", str(source)]
    if no_memory_check:  # measure what export's own estimate would refuse (preflight.EXPORT_PEAK)
        export_cmd.append("--no-memory-check")
    return {"export": [*export_cmd, "--out", str(export), "--force"],
            "quantize": [*onnxgen, "quantize", str(export), "--variant", "all"],
            "fuse": [*onnxgen, "fuse", str(export)],
            "parity": [*onnxgen, "parity", str(export)],
            "run": [*onnxgen, "run", str(export), "--prompt-file", str(prompt), "--max-new-tokens", "32", "--plain",
                    "--variant", "fp32"]}


def write_report(rows: list[dict], out: Path, chart: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    rows = sorted(rows, key=lambda r: (models.index(r["model"]), STAGES.index(r["stage"])))
    lines = ["# Peak memory of each stage", "",
             "`python benchmarks/memory.py` (see its docstring): each stage as a user runs it, in a child process, "
             "its peak RSS (process tree, psutil every 50 ms) beside the budget of issue 36: 2 x the fp32 weights "
             "+ 1.5 GB. `status` is the stage's exit: 0 passed, 1 a parity gate refused the export.", "",
             "| model | fp32 weights | stage | peak RSS | budget | within | time | status | when, machine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        budget = 2 * r["weights"] + 1.5 * GB
        lines.append(f"| {r['model']} | {r['weights'] / GB:.2f} GB | {r['stage']} | {r['peak'] / GB:.2f} GB | "
                     f"{budget / GB:.2f} GB | {'yes' if r['peak'] <= budget else '**no**'} | {r['seconds']:.0f} s | "
                     f"{r['status']} | {r['when']}, {r['machine']} |")
    out.write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        budget = 2 * mine[0]["weights"] / GB + 1.5
        ax.bar([r["stage"] for r in mine], [r["peak"] / GB for r in mine],
               color=["tab:blue" if r["peak"] / GB <= budget else "tab:red" for r in mine])
        ax.axhline(budget, color="k", ls="--", lw=1, label=f"budget {budget:.1f} GB")
        ax.set_title(model)
        ax.set_ylabel("peak RSS (GB)")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("Peak memory per stage (benchmarks/memory.py)")
    fig.tight_layout()
    fig.savefig(chart, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                    help="a run folder, a transformers folder or a GGUF file (repeatable)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep exports/bench-memory-NAME")
    ap.add_argument("--no-memory-check", action="store_true",
                    help="export even where its estimate says the model does not fit (to measure the estimate)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "MEMORY.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite MEMORY.md and the chart from MEMORY.json")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    state = args.out.with_suffix(".json")
    rows = json.loads(state.read_text()) if state.is_file() else []
    machine = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores"
    for spec in [] if args.report_only else args.model:
        name, _, source = spec.partition("=")
        export = ROOT / "exports" / f"bench-memory-{name}"
        rows = [r for r in rows if not (r["model"] == name and r["stage"] in stages)]
        prompt = export.with_name(export.name + "-prompt.txt")
        prompt.write_text(PROMPT)
        for stage, cmd in commands(name, Path(source), export, prompt, args.no_memory_check).items():
            if stage not in stages:
                continue
            peak, seconds, code, err = peak_rss(cmd, args.timeout)
            weights = fp32_weight_bytes(Path(source), export) if (export / "onnx").is_dir() else 0
            rows.append({"model": name, "stage": stage, "peak": peak, "seconds": seconds, "status": code,
                         "weights": weights, "when": time.strftime("%Y-%m-%d"), "machine": machine})
            print(f"{name} {stage}: peak {peak / GB:.2f} GB, {seconds:.0f} s, exit {code}", flush=True)
            if code not in (0, 1):
                print(err, file=sys.stderr)
                break
        prompt.unlink()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(export)], check=False)
    for r in rows:  # every row of a model carries its fp32 weights
        r["weights"] = max(x["weights"] for x in rows if x["model"] == r["model"])
    state.write_text(json.dumps(rows, indent=1) + "\n")
    write_report(rows, args.out, args.out.with_name("memory.png"))


if __name__ == "__main__":
    main()
