from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from pipeline import manifest
from pipeline.convert.genai import follow_replaced_twin
from pipeline.convert.optimize import optimize_export
from pipeline.convert.quantize.calibration import (
    CALIBRATION_LENGTH,
    CALIBRATION_WINDOWS,
    calibration_data,
)
from pipeline.convert.quantize.graph import check_graph
from pipeline.convert.quantize.recipe import DEFAULT_INT8_MODE, INT8_MODES, QUANTIZED, Recipe, recipe_for
from pipeline.convert.quantize.variants import (
    convert_fp16,
    quantize_int4,
    quantize_int8_dynamic,
    quantize_int8_static,
    quantize_weights,
)
from pipeline.errors import UserError
from pipeline.exports import fused_path, read_config, release_memory, variant_files, variant_path

log = logging.getLogger(__name__)


def quantize(folder: str | Path, variant: str, overrides: dict | None = None, *, preset: str = "default",
             int8_mode: str = DEFAULT_INT8_MODE, calibration: str | Path | None = None,
             calibration_windows: int | None = None, checkpoint: str | Path | None = None,
             progress: bool = True) -> dict:
    """The quantize stage: add or rebuild `variant` ("int8", "int4", "fp16" or "all") from onnx/model.onnx.
    int4 and blockwise int8 follow the export's default recipe (DEFAULT_RECIPES; `preset="fast"`: int4's
    FAST_INT4) with `overrides` (Recipe fields: method, block_size, head, ...; None leaves the recipe's)
    replacing its fields; GPTQ calibrates on `calibration` (a text file; default: the export's recorded corpus
    or run). Each file is renamed into place whole and recorded in the manifest (with its recipe).
    Returns {variant: details}."""
    folder = Path(folder)
    if variant not in (*QUANTIZED, "all"):
        raise UserError(f"--variant {variant}: expected one of {', '.join(QUANTIZED)} or all")
    if int8_mode not in INT8_MODES:
        raise UserError(f"--int8-mode {int8_mode}: expected one of {', '.join(INT8_MODES)}")
    fp32 = variant_path(folder, "fp32")
    if not fp32.is_file():
        raise UserError(f"export {folder}: {fp32} does not exist (run `onnxgen export` first)")
    overrides = overrides or {}
    recipes = {"int4": recipe_for(folder, "int4", preset, **overrides), "int8": recipe_for(folder, "int8", **overrides)}
    run = None
    if int8_mode == "static" and variant in ("int8", "all"):
        run = Path(checkpoint or (manifest.load(folder).get("source") or {}).get("checkpoint", ""))
        if not (run / "data" / "valid.bin").is_file():
            raise UserError(f"--int8-mode static: needs the source run's held-out split ({run / 'data' / 'valid.bin'}"
                            f" not found); pass --checkpoint RUN")
    shape = read_config(folder)
    todo = QUANTIZED if variant == "all" else (variant,)
    windows, calibration_info = None, None
    gptq = [v for v in todo
            if v in recipes and (v != "int8" or int8_mode == "blockwise") and recipes[v].method == "gptq"]
    if calibration is not None and not gptq:  # given for nothing: say so rather than quantize as if it had counted
        raise UserError(f"--calibration {calibration}: only GPTQ calibrates, and no variant this command writes uses "
                        f"it ({', '.join(f'{v}: {recipes[v].method}' for v in todo if v in recipes) or variant}); "
                        f"add --method gptq or leave --calibration out")
    if gptq:
        windows, calibration_info = calibration_data(folder, calibration, calibration_windows or CALIBRATION_WINDOWS,
                                                     min(CALIBRATION_LENGTH, shape.context), checkpoint)

    def with_calibration(details: dict, recipe: Recipe) -> dict:
        return {**details, "calibration": calibration_info} if recipe.method == "gptq" else details

    done = {}
    with tempfile.TemporaryDirectory(prefix="onnxgen-optimize-") as tmp:
        optimized = Path(tmp) / "model_optimized.onnx"
        # onnxruntime.transformers' fusions (its gpt2 model type: residual Add + norm -> SkipLayerNormalization,
        # or SkipSimplifiedLayerNormalization for RMSNorm, the one in front of the first block stays a
        # SimplifiedLayerNormalization) for every graph our decoder wrote, whatever its family: SmolLM2-135M's
        # int4 goes from 1,409 nodes to ~560. Not for Optimum's graphs (the fallback exporter), left as they are.
        opt_stats = optimize_export(folder, fp32, optimized)
        builders = {  # each: (src, dst) -> details for the manifest
            "int8": {"dynamic": quantize_int8_dynamic,
                     "blockwise": lambda s, d: with_calibration(
                         {"int8_mode": "blockwise",
                          **quantize_weights(s, d, recipes["int8"], calibration=windows, progress=progress)},
                         recipes["int8"]),
                     "static": lambda s, d: quantize_int8_static(s, d, run, progress)}[int8_mode],
            "int4": lambda s, d: with_calibration(
                {"preset": preset, **quantize_int4(s, d, recipes["int4"], calibration=windows, progress=progress)},
                recipes["int4"]),
            "fp16": convert_fp16,
        }
        for v in tqdm(todo, desc="quantize", unit="variant", disable=not progress, leave=False):
            done[v] = _write_variant(folder, v, builders[v], optimized, opt_stats)
    return done


def _write_variant(folder: Path, variant: str, build, src: Path, opt_stats: dict) -> dict:
    final = variant_path(folder, variant)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run killed with SIGKILL
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    # built in a folder of its own beside the final file: a graph past 2 GiB (the fp16 of a 1B model) comes with
    # chunks named after it (save_graph_streamed), which move in before the graph that names them
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        log.info("quantize: building onnx/%s", final.name)
        details = build(src, tmp / final.name)
        release_memory()  # the builder's graphs go before the check reads the new one
        check_graph(tmp / final.name)  # a structurally broken file never replaces a good one
        release_memory()
        # the fused twin of the variant being replaced was made from the old graph: it goes first, so that
        # `run` never pairs it with the new one (onnxgen fuse makes a new one)
        fused_path(folder, variant).unlink(missing_ok=True)
        old_chunks = variant_files(folder, variant)[1:]
        chunks = [p for p in tmp.iterdir() if p.name != final.name]
        new_chunks = {f"onnx/{p.name}" for p in chunks}
        if chunks:  # a moment without the variant rather than the old graph beside chunks not its own
            final.unlink(missing_ok=True)
        for p in [*chunks, tmp / final.name]:  # the graph last, once the chunks it names are in place
            os.chmod(p, 0o644)  # an export is meant to be shared
            os.replace(p, final.parent / p.name)
        for name in set(old_chunks) - new_chunks:
            (folder / name).unlink()  # the old graph's chunks that the new one does not have
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum((folder / name).stat().st_size for name in variant_files(folder, variant))
    details = {**details, "optimize": opt_stats, "bytes": size}
    manifest.record(folder, f"quantize:{variant}", variant_files(folder, variant), variant=variant, **details)
    if follow_replaced_twin(folder, variant):
        log.warning("quantize: genai_config.json named the fused twin of %s, which the new graph replaces: it "
                    "now names onnx/%s (onnxgen fuse, then onnxgen genai --fused, to go back)", variant, final.name)
    log.info("quantize: wrote onnx/%s (%.2f MB)", final.name, size / 1e6)
    return details
