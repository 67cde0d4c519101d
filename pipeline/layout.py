"""The export folder's contract (shared/DESIGN.md): file names, variant names, graph I/O names."""
from __future__ import annotations

from pathlib import Path

# variant -> file under onnx/; the names are transformers.js's (its `dtype` option picks them)
VARIANTS = {
    "fp32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_quantized.onnx",
    "int4": "model_q4.onnx",
}

INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def variant_path(folder: str | Path, variant: str) -> Path:
    from pipeline.errors import UserError

    if variant not in VARIANTS:
        raise UserError(f"--variant {variant}: unknown; expected one of {', '.join(VARIANTS)}")
    return Path(folder) / "onnx" / VARIANTS[variant]
