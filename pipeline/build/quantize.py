"""Quantize: an export folder's onnx/model.onnx (fp32) -> one more variant beside it.

    quantize("exports/default", "int4")          # onnx/model_q4.onnx, recorded in manifest.json
    quantize("exports/default", "all")           # int8, int4 and fp16

Every variant starts from the optimized graph (`optimize.py`: fused SkipLayerNormalization and
FastGelu, constant LM head):
    int8   onnx/model_quantized.onnx  three methods (`int8_mode`), measured on tiny and small (docs/variants.md);
           numbers below are tiny's (small: blockwise 99.6%, dynamic 97.5%, static 95.6%):
           blockwise (default): MatMulNBits with 8 bits, block 32, accuracy_level 4: the kernel quantizes
             activations per block of 32 per row, so one outlier channel costs its block only and a row's
             result does not depend on its batch. top-1 99.7%, Δppl +0.004%.
           dynamic: DynamicQuantizeMatMul, weights int8 per output channel, activations per tensor at
             run time (the method transformers.js's own q8 files use). top-1 94.8%: misses the 99%
             threshold, mostly at the LM head (the final LayerNorm's output has outlier channels, and
             one scale for the whole batch loses the rest); batched rows also change each other's logits.
           static: QDQ, activation ranges calibrated (MinMax) on held-out windows of the source run that
             the parity windows do not touch. top-1 94.3%: misses for the same per-tensor reason.
    int4   onnx/model_q4.onnx         weight-only MatMulNBits, 4 bits, block 32, symmetric, accuracy_level 4
           (int8 activations inside the kernel on CPU). LM head (`head`): int8 by default (same accuracy
           as an fp32 head at a quarter of its size; an int4 head misses top-1 97%).
    fp16   onnx/model_fp16.onnx       everything fp16 (past/present too, as the contract allows)
           except the logits, which stay an fp32 output.
The embedding Gather stays fp32 in every variant: a lookup costs nothing to run; quantizing it
(GatherBlockQuantized) would shrink the files further and is left for later.

A variant is written to a temporary file in onnx/ and renamed over the old one only when whole
(os.replace is atomic on one filesystem): a kill leaves the previous variant untouched.

onnx/model.onnx stays the plain (unfused) graph, on purpose. Measured on the `small` shape (4 layers,
256 wide, 8192 vocab; benchmarks/variants_cpu.py, 1 thread, plain and fused runs interleaved): prefill
of 128 tokens 34.7 vs 35.8 ms, one decode step 1.36 vs 1.41 ms (best of 150), i.e. no gain within the
noise: the MatMuls dominate and the fusions only remove a few cheap element-wise ops. The plain graph
uses only standard opset-17 ops, so every runtime that loads model.onnx (onnxruntime-genai,
transformers.js in the browser, other execution providers) runs it, while the fused graph's
com.microsoft ops (SkipLayerNormalization, FastGelu) are only in some builds. The quantized variants
carry contrib ops anyway (MatMulNBits, DynamicQuantizeMatMul), so they are built from the fused graph.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from pipeline import manifest
from pipeline.build.optimize import optimize
from pipeline.check.parity import window_plan
from pipeline.check.sources import run_windows
from pipeline.errors import UserError
from pipeline.exports import VARIANTS, fused_path, past_names, read_config, variant_path
from pipeline.train.families import arch_of
from pipeline.train.runs import load_model, read_tokens

log = logging.getLogger(__name__)

QUANTIZED = ("int8", "int4", "fp16")
INT8_MODES = ("dynamic", "static", "blockwise")
HEADS = ("int4", "int8", "fp32")   # the int4 variant's LM head precision
INT4_BLOCK = 32
INT4_ACCURACY = 4                   # MatMulNBits accuracy_level 4: int8 compute on CPU
DEFAULT_HEAD = "int8"               # measured: see docs/variants.md
DEFAULT_INT8_MODE = "blockwise"
FP32_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization")  # kept fp32 in the fp16 variant     # dynamic and static miss top-1 99% (above)


# ----------------------------------------------------------------------------- the graph
def _weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose second input is a constant initializer: the ones to quantize (not Q·Kᵀ, P·V)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _head_matmul(model: onnx.ModelProto) -> str:
    """The MatMul whose output feeds the `logits` output (possibly through a Cast)."""
    produced = {o: n for n in model.graph.node for o in n.output}
    node = produced["logits"]
    while node.op_type != "MatMul":
        node = produced[node.input[0]]
    return node.name


def _embedding_gather(model: onnx.ModelProto):
    """The Gather of input_ids from a (V, C) initializer: the token embedding."""
    inits = {i.name for i in model.graph.initializer}
    return next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and n.input[1] == "input_ids"), None)


def _is_tied(model: onnx.ModelProto) -> bool:
    """The LM head's weight is the embedding transposed (a tied head: GPT-2, SmolLM2, ...)."""
    inits = {i.name: i for i in model.graph.initializer}
    gather, head = _embedding_gather(model), next(n for n in model.graph.node if n.name == _head_matmul(model))
    if gather is None or head.input[1] not in inits:
        return False
    table, weight = (numpy_helper.to_array(inits[n]) for n in (gather.input[0], head.input[1]))
    return table.shape[::-1] == weight.shape and np.array_equal(table.T, weight)


def compact_embedding(model: onnx.ModelProto, bits: int, tied: bool) -> dict:
    """The embedding lookup quantized with the weights: a com.microsoft GatherBlockQuantized (blocks of
    INT4_BLOCK along the hidden axis, symmetric, `bits` bits). A tied head's MatMulNBits already holds the
    same table quantized the same way, (V, C/block, block*bits/8) bytes and (V, C/block) scales, so the lookup
    reads those through a Reshape and the file carries the table once (as onnxruntime-genai's builder does).
    Written by hand: onnxruntime's MatMulNBitsQuantizer quantizes a Gather on its own (a second copy of a tied
    table), and nothing in it shares one. Returns what it did, for the manifest."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    g = model.graph
    gather = _embedding_gather(model)
    if gather is None:
        return {"embedding": "fp32 (no Gather of input_ids from a constant table)"}
    head = None
    if tied:
        produced = {o: n for n in g.node for o in n.output}
        head = produced["logits"]
        while head.op_type not in ("MatMulNBits", "MatMul"):
            head = produced[head.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        if head.op_type != "MatMulNBits" or attrs.get("bits") != bits or attrs.get("block_size") != INT4_BLOCK \
                or len(head.input) > 3:
            head = None  # a head kept fp32 or at other bits: the lookup gets its own table
    if head is None:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=INT4_BLOCK, is_symmetric=True,
                                 op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
                                 nodes_to_include=[gather.name])
        q.process()
        return {"embedding": f"GatherBlockQuantized, {bits} bits, own table"}
    table = gather.input[0]
    vocab, hidden = next(list(i.dims) for i in g.initializer if i.name == table)
    shape = f"onnxgen/embedding_shape"
    g.initializer.append(numpy_helper.from_array(np.array([vocab, hidden * bits // 8], np.int64), shape))
    packed = "onnxgen/embedding_packed"
    new = [helper.make_node("Reshape", [head.input[1], shape], [packed], name="/wte/Reshape"),
           helper.make_node("GatherBlockQuantized", [packed, gather.input[1], head.input[2]], list(gather.output),
                            name="/wte/GatherBlockQuantized", domain="com.microsoft", bits=bits,
                            block_size=INT4_BLOCK, gather_axis=0, quantize_axis=1)]
    at = list(g.node).index(gather)
    g.node.remove(gather)
    for k, node in enumerate(new):
        g.node.insert(at + k, node)
    if not any(n.input and table in n.input for n in g.node):
        g.initializer.remove(next(i for i in g.initializer if i.name == table))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"embedding": f"GatherBlockQuantized, {bits} bits, shared with the tied head"}


# ----------------------------------------------------------------------------- the variants
def quantize_int8_dynamic(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    nodes = _weight_matmuls(model)
    quantize_dynamic(model, str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                     extra_options={"MatMulConstBOnly": True})
    return {"method": "DynamicQuantizeMatMul", "int8_mode": "dynamic", "per_channel": True, "weight_type": "int8", "matmuls": len(nodes)}


class _Windows:
    """CalibrationDataReader over (n, T) token windows, one window per call, empty past; shows progress."""

    def __init__(self, windows: np.ndarray, n_layer: int, n_head: int, head_dim: int, progress: bool):
        self.windows, self.past = windows, past_names(n_layer)
        self.shape = (1, n_head, 0, head_dim)
        self.bar = tqdm(total=len(windows), desc="calibrating int8", unit="window", disable=not progress)
        self.i = 0

    def get_next(self):
        if self.i == len(self.windows):
            self.bar.close()
            return None
        ids = self.windows[self.i: self.i + 1]
        self.i += 1
        self.bar.update(1)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(ids.shape[1])[None]}
        feed.update({n: np.zeros(self.shape, np.float32) for n in self.past})
        return feed

    def rewind(self):
        self.i = 0


def calibration_windows(run: Path, n_ctx: int, n: int = 32) -> np.ndarray:
    """(n, T) held-out windows that do not overlap the parity windows (sources.run_windows): taken from
    the gaps between them, so calibration never sees the tokens it is judged on."""
    valid = read_tokens(run, "valid").astype(np.int64)
    judged = run_windows(run, *window_plan(n_ctx))
    T = judged.shape[1]
    taken = np.zeros(len(valid), bool)
    starts = np.linspace(0, len(valid) - T - 1, len(judged)).astype(np.int64)
    for s in starts:
        taken[s: s + T + 1] = True
    csum = np.concatenate([[0], np.cumsum(taken)])
    fits = np.flatnonzero(csum[T:] - csum[:-T] == 0)  # starts whose T tokens are all untouched
    free, end = [], 0
    for start in fits:  # non-overlapping, first come first served
        if start >= end:
            free.append(int(start))
            end = start + T
    if not free:
        raise UserError(f"calibration: {run / 'data' / 'valid.bin'} has no held-out tokens outside the "
                        f"parity windows (need windows of {T} tokens)")
    pick = np.linspace(0, len(free) - 1, min(n, len(free))).astype(np.int64)
    return np.stack([valid[free[i]: free[i] + T] for i in pick])


def quantize_int8_static(src: Path, dst: Path, run: Path, progress: bool) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    c = load_model(run).config
    windows = calibration_windows(run, c.n_ctx)
    model = onnx.load(str(src))
    nodes = _weight_matmuls(model)
    reader = _Windows(windows, c.n_layer, c.n_head, c.head_dim, progress)
    # uint8 activations and int8 weights: the pairing ONNX Runtime recommends for CPU (VNNI/AVX2 kernels)
    quantize_static(model, str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"MatMulConstBOnly": True})
    return {"method": "QDQ", "int8_mode": "static", "per_channel": True, "calibration": "MinMax",
            "calibration_windows": int(len(windows)), "window_length": int(windows.shape[1]),
            "matmuls": len(nodes)}


def quantize_int8_blockwise(src: Path, dst: Path) -> dict:
    """Weight-only int8 MatMulNBits (bits=8, block 32, accuracy_level 4): the kernel quantizes the
    activations per block of 32 per row, not per tensor, so one outlier channel costs its block only
    and a row's result does not depend on the other rows in the batch."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    tied = _is_tied(model)
    q = MatMulNBitsQuantizer(model, bits=8, block_size=INT4_BLOCK, is_symmetric=True,
                             accuracy_level=INT4_ACCURACY)
    q.process()
    model = q.model.model
    table = compact_embedding(model, 8, tied)
    onnx.save(model, str(dst))
    return {"method": "MatMulNBits", "int8_mode": "blockwise", "bits": 8, "block_size": INT4_BLOCK, "symmetric": True,
            "accuracy_level": INT4_ACCURACY, **table}


def _block_of(node_name: str) -> int | None:
    """The transformer block a weight MatMul belongs to, from the exporters' node names
    (/h.3/mlp/c_fc/MatMul ours and GPT-2's, /model/layers.3/... Llama-style), or None."""
    m = re.search(r"/(?:h|layers)\.(\d+)/", node_name)
    return int(m.group(1)) if m else None


def quantize_int4(src: Path, dst: Path, head: str = DEFAULT_HEAD) -> dict:
    """4-bit MatMulNBits, except the LM head (`head`) and, in models of more than two blocks, the first
    and last blocks, which get 8 bits (as llama.cpp's K-quants give their most sensitive tensors more
    bits). Measured on the fully trained `small` (900 steps), top-1 against PyTorch: every block 4-bit
    96.39% (misses 97%; asymmetric 96.97%, HQQ 96.97%, block 16 96.29%, only c_attn 8-bit 97.46%);
    first and last blocks 8-bit 98.34%, greedy 64/64, for 0.8 MB more (13.87 vs 13.08 MB)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    tied = _is_tied(model)
    head_node = _head_matmul(model)
    weights = _weight_matmuls(model)
    blocks = {n: _block_of(n) for n in weights}
    known = sorted({b for b in blocks.values() if b is not None})
    eight_bit_blocks = [known[0], known[-1]] if len(known) > 2 else []
    eight = [n for n, b in blocks.items() if b in eight_bit_blocks] + ([head_node] if head == "int8" else [])
    keep = [head_node] if head != "int4" else []
    q = MatMulNBitsQuantizer(model, bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                             accuracy_level=INT4_ACCURACY, nodes_to_exclude=sorted(set(eight + keep)))
    q.process()
    model = q.model.model
    if eight:
        q8 = MatMulNBitsQuantizer(model, bits=8, block_size=INT4_BLOCK, is_symmetric=True,
                                  accuracy_level=INT4_ACCURACY, nodes_to_include=eight)
        q8.process()
        model = q8.model.model
    left = [n for n in _weight_matmuls(model) if n != head_node]
    assert not left, f"int4: MatMuls left unquantized: {left}"
    # the lookup at the head's precision: one table when tied (an fp32 head: a 4-bit table of its own)
    table = compact_embedding(model, {"int8": 8, "int4": 4}.get(head, 4), tied)
    onnx.save(model, str(dst))
    return {"method": "MatMulNBits", "bits": 4, "block_size": INT4_BLOCK, "symmetric": True,
            "accuracy_level": INT4_ACCURACY, "lm_head": head, "eight_bit_blocks": eight_bit_blocks, **table}


def _drop_duplicate_casts(graph) -> None:
    """Written by hand for a converter bug: with an op_block_list, convert_float_to_float16 gives a
    tensor that feeds two blocked nodes one identical Cast per consumer, all with the same output name
    (a graph that is no longer single-assignment; seen on optimum's GPT-2 graph). Keep the first."""
    seen = set()
    for node in list(graph.node):
        if node.op_type == "Cast" and node.output[0] in seen:
            graph.node.remove(node)
        seen.update(node.output)


def convert_fp16(src: Path, dst: Path) -> dict:
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    # keep_io_types=["logits"]: the logits output stays fp32 (the contract), past/present go fp16.
    # LayerNorms stay fp32 (their mean and variance lose most in half precision; the weights are tiny):
    # measured on the fully trained `small`, all-fp16 max |Δlogit| 1.45e-2 (misses 1e-2), LayerNorms
    # fp32 7.8e-3 at the same size; the head in fp32 instead gave 1.27e-2 for 4 MB more.
    model.convert_float_to_float16(keep_io_types=["logits"], op_block_list=list(FP32_OPS))
    _drop_duplicate_casts(model.model.graph)
    model.save_model_to_file(str(dst), use_external_data_format=False)
    return {"method": "float16", "logits": "fp32", "past": "fp16", "fp32_ops": list(FP32_OPS)}


# ----------------------------------------------------------------------------- the stage
def quantize(folder: str | Path, variant: str, int8_mode: str = DEFAULT_INT8_MODE, head: str = DEFAULT_HEAD,
             checkpoint: str | Path | None = None, progress: bool = True) -> dict:
    """The quantize stage: add or rebuild `variant` ("int8", "int4", "fp16" or "all") from onnx/model.onnx.
    Each file is renamed into place whole and recorded in the manifest. Returns {variant: details}."""
    folder = Path(folder)
    if variant not in (*QUANTIZED, "all"):
        raise UserError(f"--variant {variant}: expected one of {', '.join(QUANTIZED)} or all")
    if int8_mode not in INT8_MODES:
        raise UserError(f"--int8-mode {int8_mode}: expected one of {', '.join(INT8_MODES)}")
    if head not in HEADS:
        raise UserError(f"--head {head}: expected one of {', '.join(HEADS)}")
    fp32 = variant_path(folder, "fp32")
    if not fp32.is_file():
        raise UserError(f"export {folder}: {fp32} does not exist (run `onnxgen export` first)")
    run = None
    if int8_mode == "static" and variant in ("int8", "all"):
        run = Path(checkpoint or (manifest.load(folder).get("source") or {}).get("checkpoint", ""))
        if not (run / "data" / "valid.bin").is_file():
            raise UserError(f"--int8-mode static: needs the source run's held-out split ({run / 'data' / 'valid.bin'}"
                            f" not found); pass --checkpoint RUN")
    shape = read_config(folder)
    # onnxruntime.transformers' fusions (its gpt2 model type: residual Add + norm -> SkipLayerNormalization,
    # or SkipSimplifiedLayerNormalization for RMSNorm, the one in front of the first block stays a
    # SimplifiedLayerNormalization) for every graph our decoder wrote, whatever its family: SmolLM2-135M's
    # int4 goes from 1,409 nodes to ~560. Not for Optimum's graphs (the fallback exporter), left as they are.
    exporter = (manifest.load(folder).get("stages") or [{}])[0].get("exporter")
    num_heads, hidden, fuse = shape.heads, shape.hidden, exporter != "optimum"
    done = {}
    with tempfile.TemporaryDirectory(prefix="onnxgen-optimize-") as tmp:
        optimized = Path(tmp) / "model_optimized.onnx"
        arch = arch_of(folder)
        norm = arch.norm if arch is not None else "layernorm"
        opt_stats = optimize(fp32, optimized, num_heads, hidden, fuse=fuse, norm=norm)
        builders = {  # each: (src, dst) -> details for the manifest
            "int8": {"dynamic": quantize_int8_dynamic, "blockwise": quantize_int8_blockwise,
                     "static": lambda s, d: quantize_int8_static(s, d, run, progress)}[int8_mode],
            "int4": lambda s, d: quantize_int4(s, d, head),
            "fp16": convert_fp16,
        }
        todo = QUANTIZED if variant == "all" else (variant,)
        for v in tqdm(todo, desc="quantize", unit="variant", disable=not progress, leave=False):
            done[v] = _write_variant(folder, v, builders[v], optimized, opt_stats)
    return done


# onnxruntime's ops that it registers in the ONNX domain itself (onnxruntime.transformers' RMSNorm fusion
# writes one; so does onnxruntime-genai's builder): onnx.checker has no schema for them
ORT_OPS_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}


def check_graph(path: Path) -> None:
    """onnx.checker on a variant, with the ops above taken as the contrib ops they are (a domain onnx does
    not know is not checked) and every other node checked as usual."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.domain == "" and node.op_type in ORT_OPS_IN_ONNX_DOMAIN:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model)


def _write_variant(folder: Path, variant: str, build, src: Path, opt_stats: dict) -> dict:
    final = variant_path(folder, variant)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a run killed with SIGKILL
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=".onnx", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("quantize: building onnx/%s", final.name)
        details = build(src, tmp)
        check_graph(tmp)  # a structurally broken file never replaces a good one
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an export is meant to be shared
        # the fused twin of the variant being replaced was made from the old graph: it goes first, so that
        # `run` never pairs it with the new one (onnxgen fuse makes a new one)
        fused_path(folder, variant).unlink(missing_ok=True)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = final.stat().st_size
    details = {**details, "optimize": opt_stats, "bytes": size}
    manifest.record(folder, f"quantize:{variant}", [f"onnx/{VARIANTS[variant]}"], variant=variant, **details)
    log.info("quantize: wrote onnx/%s (%.2f MB)", final.name, size / 1e6)
    return details
