"""The issue-4 benchmark: onnxgen against PyTorch eager, Optimum and onnxruntime-genai.

    python benchmarks/run.py                  # small preset -> benchmarks/RESULTS.md + results.png
    python benchmarks/run.py --base           # and the base preset (larger than cache), for the bandwidth target

The models are the presets' shapes with (almost) random weights: one training step, enough for a
real tokenizer, checkpoint and export; speed does not depend on what the weights learned. They are
built once under benchmarks/.cache/. The int8 and int4 variants are made here with
onnxruntime.quantization directly (int4: MatMulNBits, block 32, accuracy level 4; int8: dynamic,
per channel) until pipeline.build.quantize (issue 3) lands; then each variant gets its fused twin
(pipeline.build.fuse). Timings are interleaved rounds on a machine shared with other jobs: see RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import sysconfig
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.check.bench import bench  # noqa: E402
from pipeline.exports import VARIANTS  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


def build(preset: str, batch_size: int) -> Path:
    from pipeline.build.export import export
    from pipeline.build.fuse import fuse_export
    from pipeline.train.loop import train

    run, folder = CACHE / "runs" / preset, CACHE / "exports" / preset
    if not (folder / "onnx" / VARIANTS["fp32"]).is_file():
        train(run, preset=preset, corpus=str(CORPUS), force=True, progress=False,
              overrides={"steps": 1, "batch_size": batch_size, "eval_batches": 1, "warmup": 1})
        export(run, folder, force=True)
    onnx_dir = folder / "onnx"
    if not (onnx_dir / VARIANTS["int8"]).is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(onnx_dir / VARIANTS["fp32"]), str(onnx_dir / VARIANTS["int8"]),
                         weight_type=QuantType.QInt8, per_channel=True)
    if not (onnx_dir / VARIANTS["int4"]).is_file():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(onnx_dir / VARIANTS["fp32"])), block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(onnx_dir / VARIANTS["int4"]), False)
    fuse_export(folder, ["fp32", "int8", "int4"])
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
