"""CPU latency of each variant, and of the plain vs the fused fp32 graph (issue 3's question: should
onnx/model.onnx be the optimized graph?). Prints a markdown table.

    python benchmarks/variants_cpu.py EXPORT [--threads 1] [--reps 30]

EXPORT needs all four variants (`onnxgen quantize EXPORT --variant all`). The fused fp32 graph is built
on the fly with pipeline.convert.optimize. Each number is the median of --reps runs after 3 warm-ups:
a prefill of 128 tokens (batch 1, past 0) and one decode step (batch 1, past 128).
Sessions run at ONNX Runtime's default level (ORT_ENABLE_ALL), as OnnxLM does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.exports import VARIANTS, variant_path
from pipeline.convert.optimize import optimize


def session(path: Path, threads: int) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.log_severity_level = 3
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def feeds(s: ort.InferenceSession, T: int, P: int) -> dict:
    ins = {i.name: i for i in s.get_inputs()}
    past = [n for n in ins if n.startswith("past_key_values.")]
    _, H, _, D = ins[past[0]].shape
    dtype = np.float16 if ins[past[0]].type == "tensor(float16)" else np.float32
    f = {"input_ids": np.random.randint(0, 100, (1, T)).astype(np.int64),
         "attention_mask": np.ones((1, P + T), np.int64),
         "position_ids": np.arange(P, P + T)[None].astype(np.int64)}
    f.update({n: np.random.randn(1, H, P, D).astype(dtype) for n in past})
    return f


def median_ms(s, f, reps: int) -> float:
    for _ in range(3):
        s.run(None, f)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s.run(None, f)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    c = json.loads((a.export / "config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        fused = Path(tmp) / "fused.onnx"
        optimize(variant_path(a.export, "fp32"), fused, c["n_head"], c["n_embd"])
        paths = {"fp32 (plain, model.onnx)": variant_path(a.export, "fp32"), "fp32 (fused)": fused}
        paths.update({f"{v} ({VARIANTS[v]})": variant_path(a.export, v) for v in ("int8", "int4", "fp16")
                      if variant_path(a.export, v).is_file()})
        print(f"| graph | size MB | prefill 128 ms | decode step ms (past 128) |  threads={a.threads}")
        print("| --- | --- | --- | --- |")
        for name, p in paths.items():
            s = session(p, a.threads)
            pre = median_ms(s, feeds(s, 128, 0), a.reps)
            dec = median_ms(s, feeds(s, 1, 128), a.reps)
            print(f"| {name} | {p.stat().st_size / 1e6:.2f} | {pre:.2f} | {dec:.3f} |", flush=True)


if __name__ == "__main__":
    main()
