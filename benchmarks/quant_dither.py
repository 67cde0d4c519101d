"""A continuous-weight stand-in for SmolLM2-135M-Instruct, for judging 4-bit recipes (issue 13).

    python benchmarks/quant_dither.py SRC_HF_FOLDER OUT_HF_FOLDER

Why: the SmolLM2-135M-Instruct folder this project has was converted from SmolLM2-135M-Instruct.Q4_1.gguf
(/work/cache/convert_smollm2.py): every attention and MLP weight already lies on a Q4_1 grid (blocks of 32
along the input axis, w = m + d·q, q in 0..15; the token embedding on Q8_0's). A recipe that can represent
that grid (HQQ's float zero points) re-quantizes it almost losslessly, so on this model 4-bit numbers say how
well a recipe recovers a grid, not how it quantizes a real fp32 model. This writes a model whose weights are
the same plus uniform noise of one grid step (each block's own d; the embedding's Q8_0 step), seeded: a
plausible fp32 parent of the GGUF, with the same shapes, scales and outliers, and no grid to find. Its
quantized variants are then scored against its own fp32 graph like any other export.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

SEED, BLOCK = 0, 32


def dither(w: torch.Tensor, rng: np.random.Generator, q8: bool) -> torch.Tensor:
    """w (out, in): noise uniform in ±step/2, step per block of 32 along `in` (Q4_1: (max-min)/15;
    Q8_0: max|w|/127)."""
    x = w.double().numpy()
    out, k = x.shape
    g = x.reshape(out, k // BLOCK, BLOCK)
    step = np.abs(g).max(-1, keepdims=True) / 127 if q8 else (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / 15
    noisy = g + (rng.random(g.shape) - 0.5) * step
    return torch.from_numpy(noisy.reshape(out, k).astype(np.float32))


def main(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    rng = np.random.default_rng(SEED)
    tensors = load_file(str(src / "model.safetensors"))
    changed = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.ndim == 2 and (name.endswith("proj.weight") or name.endswith("embed_tokens.weight")):
            tensors[name] = dither(t, rng, q8=name.endswith("embed_tokens.weight"))
            changed += 1
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    print(f"{dst}: {changed} weights dithered (seed {SEED})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
