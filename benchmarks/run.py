"""The issue-4 benchmark: onnxgen against PyTorch eager, Optimum and onnxruntime-genai.

    python benchmarks/run.py                  # small preset -> benchmarks/RESULTS.md + results.png
    python benchmarks/run.py --base           # and the base preset (larger than cache), for the bandwidth target

The models are the presets' shapes with (almost) random weights: one training step, enough for a
real tokenizer, checkpoint and export; speed does not depend on what the weights learned. They are
built once under benchmarks/.cache/. Every variant is made by the real stages, as `make export` makes
them (pipeline.convert.quantize, then pipeline.convert.fuse for the fused twins), so the graphs timed are
the graphs onnxgen ships. Timings are interleaved rounds on a machine shared with other jobs: see RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.check.bench import bench  # noqa: E402
from pipeline.exports import VARIANTS  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def build(preset: str, batch_size: int) -> Path:
    from pipeline.convert.export import export
    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.quantize import quantize
    from pipeline.train.loop import train

    run, folder = CACHE / "runs" / preset, CACHE / "exports" / preset
    if not (folder / "onnx" / VARIANTS["fp32"]).is_file():
        train(run, preset=preset, corpus=str(CORPUS), force=True, progress=False,
              overrides={"steps": 1, "batch_size": batch_size, "eval_batches": 1, "warmup": 1})
        export(run, folder, force=True)
    for v in ("int8", "int4"):
        if not (folder / "onnx" / VARIANTS[v]).is_file():
            quantize(folder, v, progress=False)
    # speed does not depend on what the weights learned, but parity does: twins of one-step weights are
    # not judged (their near-uniform logits tie everywhere)
    fuse_export(folder, ["fp32", "int8", "int4"], check=False)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--base", action="store_true", help="also the base preset (~92M parameters)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s")
    out = ROOT / "benchmarks" / "RESULTS.md"
    sections = []
    small = build("small", 16)
    bench(small, out.with_name("small.md"), rounds=args.rounds, tokens=args.tokens, threads=args.threads,
          title="small preset", chart=out.with_name("results.png"))
    sections.append(out.with_name("small.md").read_text())
    if args.base:
        base = build("base", 1)
        bench(base, out.with_name("base.md"), rounds=max(3, args.rounds // 2), tokens=min(args.tokens, 64),
              threads=args.threads, engines=["genai", "onnxgen"], rss=False, title="base preset",
              chart=out.with_name("results_base.png"))
        sections.append(out.with_name("base.md").read_text())
    quant = ROOT / "benchmarks" / "QUANT_SUMMARY.md"  # written by benchmarks/quant_quality.py --report
    if quant.is_file():
        sections.append(quant.read_text())
    notes = (ROOT / "benchmarks" / "NOTES.md").read_text() if (ROOT / "benchmarks" / "NOTES.md").is_file() else ""
    text = "# onnxgen generation benchmark\n\nWritten by `python benchmarks/run.py` (or `onnxgen bench EXPORT`).\n\n"
    tmp = out.with_name("RESULTS.md.tmp")
    tmp.write_text(text + "\n".join(sections) + ("\n" + notes if notes else ""))
    tmp.replace(out)
    for part in ("small.md", "base.md"):
        out.with_name(part).unlink(missing_ok=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
