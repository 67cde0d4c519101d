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
    int4   onnx/model_q4.onnx         weight-only MatMulNBits, 4 bits (a `Recipe`: method, block size, zero
           points, accuracy_level, which tensors get 8 bits). LM head (`head`): int8 by default (same accuracy
           as an fp32 head at a quarter of its size; an int4 head misses top-1 97%).
    fp16   onnx/model_fp16.onnx       everything fp16 (past/present too, as the contract allows)
           except the logits, which stay an fp32 output.
The embedding lookup is a GatherBlockQuantized reading the tied head's MatMulNBits table (one copy), or
its own 4-bit table when the head is not tied or kept fp32 (compact_embedding).

Recipes (issue 13; benchmarks/QUANT.md, measured on SmolLM2-135M-Instruct against its own fp32 graph):
    DEFAULT_RECIPES holds one per variant for models trained here (set on tiny/small, whose thresholds they
    pass: RTN symmetric, block 32, accuracy_level 4, first/last blocks 8-bit) and one for imports.
    method rtn   onnxruntime's MatMulNBitsQuantizer (MLAS round to nearest; integer zero points if asymmetric)
           hqq   onnxruntime's HQQ: float zero points (+1 bit a weight at block 32) that MLAS has no fast
                 kernel for: decode 6-9x slower on CPU
           gptq  written here (gptq_weight/hessians): onnxruntime 1.32's own gptq() propagates no error
                 (it reads a column of the upper Cholesky factor, all zeros below the diagonal: its
                 result equals round-to-nearest's), and gptq_quantize runs the model once per activation
                 per window. Calibrated on `--calibration` text (default: the export's corpus).
    accuracy_level 4 (int8 activations per block inside the kernel) costs int8 most of its KL on SmolLM2
    (4.4e-3 vs 1.4e-3 at level 0, but level 0 decodes 6x slower); smaller blocks quantize the activations
    in smaller blocks too: block 16 gives 2.7e-3 at full speed. int4 loses almost nothing to it (0.2145 vs
    0.2116): its weights dominate.

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
So is the fp32 twin of `onnxgen fuse` (build/fuse.py), which only onnxgen's runtime loads: there, with the
attention in one kernel and the cache in place, the element-wise ops are a larger share of a step (small
preset, batch 1: 103 kernels -> 56, ~8% faster).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from pipeline import manifest
from pipeline.build.genai import follow_replaced_twin
from pipeline.build.optimize import optimize_export
from pipeline.check.parity import window_plan
from pipeline.check.sources import run_windows
from pipeline.errors import UserError
from pipeline.exports import VARIANTS, fused_path, past_names, read_config, variant_path
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


# ----------------------------------------------------------------------------- recipes
METHODS = ("rtn", "hqq", "gptq")
SCALES = ("fp16", "fp32")
KINDS = {  # our decoder's weight MatMuls (train/decoder.py names them GPT-2's way, whatever the family)
    "qkv": "attn/c_attn", "o": "attn/c_proj", "gate_up": "mlp/c_fc", "up": "mlp/c_fc", "down": "mlp/c_proj"}


@dataclass(frozen=True)
class Recipe:
    """How the weight MatMuls of a variant are quantized (recorded in the manifest as .summary()).

    bits          the body's bits (4 or 8)
    method        rtn: round to nearest (onnxruntime's MLAS quantizer); hqq: onnxruntime's HQQ (fp32 zero
                  points, asymmetric); gptq: error-compensating, needs calibration windows (`gptq_quantize`)
    block_size    weights per scale along the input axis (32, 64, 128)
    symmetric     rtn only: no zero points (hqq is always asymmetric, gptq follows this flag)
    accuracy_level  MatMulNBits' compute type on CPU: 4 = int8 activations per block, 0 = fp32
    head          the LM head's (and, tied, the embedding's) precision: int4, int8, fp32; always symmetric
                  (the embedding lookup reads a tied head's table, without zero points). Round to nearest,
                  except a 4-bit head under method gptq, which GPTQ solves too: on SmolLM2 (tied, block 64,
                  act order, q/k/v and first/last 8-bit) KLD 0.237 with an RTN 4-bit head, 0.084 with GPTQ's,
                  both 88.8 MB (benchmarks/QUANT.md). The embedding then reads the head's solution, which
                  serves the logits first; the measured KLD is that of the whole graph, lookup included
    eight_bit     body tensors that get 8 bits: "first_last" (first and last blocks), "block:0,29",
                  a kind ("qkv", "o", "gate_up", "down") optionally with layers ("down:0-3,27", "down:outer":
                  the first and last sixth of the blocks)
    fp32_compute  tensors (same selectors, and "head") run at accuracy_level 0 whatever accuracy_level says
    head_block    the head's (and tied embedding's) block size; 0: block_size. An 8-bit head is 8 bits of
                  code and, at block 32, 1 bit of fp32 scale a weight: block 128 takes that to 0.25
    act_order     gptq only: rows by decreasing Hessian diagonal, with static groups (gptq_weight)
    grid_search   gptq only: each block's range shrunk to the one that rounds it with the least
                  Hessian-weighted error (_grid), instead of the full min/max range
    scales        how the file stores the scales: "fp16" (an fp16 initializer and a Cast to the fp32 that
                  MatMulNBits takes in an fp32 graph, which onnxruntime folds when it loads the session:
                  store_scales_fp16) or "fp32". At block 32 an fp32 scale costs 1 bit a weight, fp16 0.5
                  (llama.cpp's blocks store fp16 scales too): SmolLM2's int4 94.9 -> 86.5 MB, same speed
    """
    bits: int = 4
    method: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    head: str = "int8"
    eight_bit: tuple[str, ...] = ("first_last",)
    fp32_compute: tuple[str, ...] = ()
    head_block: int = 0
    act_order: bool = False
    grid_search: bool = False
    scales: str = "fp16"

    @property
    def head_block_size(self) -> int:
        return self.head_block or self.block_size

    @property
    def gptq_head(self) -> bool:
        return self.method == "gptq" and self.head == "int4"

    def summary(self) -> dict:
        return {"method": self.method, "bits": self.bits, "block_size": self.block_size,
                "symmetric": self.symmetric if self.method != "hqq" else False,
                "accuracy_level": self.accuracy_level, "lm_head": self.head, "lm_head_block": self.head_block_size,
                **({"lm_head_method": "gptq"} if self.gptq_head else {}),
                "eight_bit": list(self.eight_bit),
                **({"act_order": True} if self.act_order and self.method == "gptq" else {}),
                **({"grid_search": True} if self.grid_search and self.method == "gptq" else {}),
                "scales": self.scales,
                **({"fp32_compute": list(self.fp32_compute)} if self.fp32_compute else {})}



# The default recipe per variant: for models trained here ("trained", set on tiny and small, whose
# thresholds they pass) and for imports ("import", set on SmolLM2-135M-Instruct by
# benchmarks/quant_quality.py, see benchmarks/QUANT.md).
#   import int8: block 16: the kernel's int8 activations come in blocks of 16 as well; SmolLM2 KLD 2.7e-3
#     against block 32's 4.4e-3 (dithered: 3.05e-3 against 5.1e-3), same decode speed, 169 MB against 152
#     with fp32 scales (accuracy_level 0 gives 1.4e-3 but decodes 6x slower); 152 MB and 2.76e-3 with fp16.
#   import int4: GPTQ with zero points, in act order, searched grids, block 32, calibrated on the export's
#     corpus; fp16 scales. 8 bits for every q/k/v projection, the first and last blocks and the down
#     projections of the outer blocks (the first and last sixth: SmolLM2's 0-4 and 25-29): per MB the most
#     sensitive tensors (on the dithered SmolLM2, the rest round-to-nearest 4-bit, 8 bits cut KLD by 0.019
#     a MB for q/k/v, 0.021 first/last blocks, 0.008 down, 0.004 gate/up, 0.003 o). The head (and the tied
#     embedding, which reads its table) 4-bit, solved by GPTQ too, at block 16. On SmolLM2-135M-Instruct,
#     8,192 scored tokens of English text (benchmarks/QUANT.md), calibrated on other English text: 94.6 MB,
#     KLD 0.049, same top-1 88.2%, PPL ratio 1.048 on the dithered stand-in (converted: 0.041 / 88.8% /
#     1.026); calibrated on the default corpus (Python source) 0.051 / 87.4% / 1.055 on the converted model.
#     The previous default (8-bit head, fp32 scales) was 0.039 / 89.4% / 1.038 at 111.9 MB. The head's
#     block 16 costs ~10% of decode speed against 32 (benchmarks/REAL_MODEL.md). Costs a calibration pass
#     (~4 min for SmolLM2 on 2 cores).
DEFAULT_RECIPES = {
    "trained": {"int8": Recipe(bits=8, eight_bit=()), "int4": Recipe()},
    "import": {"int8": Recipe(bits=8, eight_bit=(), block_size=16),
               "int4": Recipe(method="gptq", symmetric=False, act_order=True, grid_search=True, head="int4",
                              head_block=16, eight_bit=("first_last", "qkv", "down:outer"))},
}


# The "fast" int4 recipe (`quantize --recipe fast`): the default's method, every tensor 4-bit at block 64, the head
# (and the tied embedding that reads its table) included. For speed: a batch-1 decode step reads every weight
# once, and MLAS's 4-bit kernel is faster per weight at block 64 than at 32 (fewer blocks to scale and sum)
# while the default's 8-bit tensors and block-16 head cost more per weight than they save in error. On
# SmolLM2-135M-Instruct (benchmarks/REAL_MODEL.md, QUANT.md): 73.5 MB, KLD 0.096, same top-1 83.5%, PPL ratio
# 1.074 (the default: 94.6 MB, 0.041 / 88.8% / 1.026; onnxruntime-genai's builder int4: 86 MB, 0.439 / 63.2% /
# 1.372), decoding 1.3-1.5x the default's speed (three side-by-side runs, 1 and 2 threads). Block 128 is
# faster still but pads SmolLM2's 576-long rows to 640 (77.2 MB) and loses more (KLD 0.126).
FAST_INT4 = {"block_size": 64, "head": "int4", "head_block": 64, "eight_bit": ()}
RECIPE_PRESETS = ("default", "fast")


def _layers(spec: str, known: list[int]) -> set[int]:
    """Blocks by number ("1-4,25", negative from the end) or "outer": the first and last sixth of the
    blocks, rounded up (SmolLM2's 30: 0-4 and 25-29), where llama.cpp's K-quants spend more bits too."""
    if spec == "outer":
        k = -(-len(known) // 6)
        return set(known[:k] + known[-k:])
    out = set()
    for part in spec.split(","):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part.strip())
        if m is None:
            raise UserError(f"layers {spec!r}: expected numbers and ranges (1-4,25,-1) or outer")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        out.update(range(lo if lo >= 0 else known[-1] + 1 + lo, (hi if hi >= 0 else known[-1] + 1 + hi) + 1))
    return out


def _kind_of(node_name: str) -> str | None:
    m = re.search(r"/(attn|mlp)/(c_attn|c_proj|c_fc)/", node_name)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def select(model: onnx.ModelProto, selectors: tuple[str, ...]) -> set[str]:
    """The weight MatMuls that `selectors` name: "first_last" (first and last blocks, models of more than
    two), "block:LAYERS", a kind (qkv, o, gate_up, down) optionally ":LAYERS", or "head"."""
    head = _head_matmul(model)
    weights = _weight_matmuls(model)
    blocks = {n: _block_of(n) for n in weights}
    known = sorted({b for b in blocks.values() if b is not None})
    out: set[str] = set()
    for sel in selectors:
        what, _, layers = sel.partition(":")
        if what == "first_last":
            chosen = {known[0], known[-1]} if len(known) > 2 else set()
            out |= {n for n, b in blocks.items() if b in chosen}
        elif what == "block":
            chosen = _layers(layers, known)
            out |= {n for n, b in blocks.items() if b in chosen}
        elif what in KINDS:
            chosen = _layers(layers, known) if layers else set(known)
            out |= {n for n, b in blocks.items() if b in chosen and _kind_of(n) == KINDS[what]}
        elif what == "head":
            out.add(head)
        else:
            raise UserError(f"tensor selector {sel!r}: expected first_last, block:LAYERS, head or one of "
                            f"{', '.join(KINDS)} (optionally :LAYERS)")
    return out


def plan_bits(model: onnx.ModelProto, recipe: Recipe) -> dict[str, int | None]:
    """{weight MatMul: bits, None for fp32} per the recipe; the head by recipe.head."""
    head = _head_matmul(model)
    eight = select(model, recipe.eight_bit)
    plan = {n: (8 if n in eight or recipe.bits == 8 else recipe.bits) for n in _weight_matmuls(model) if n != head}
    plan[head] = {"int4": 4, "int8": 8, "fp32": None}[recipe.head]
    return plan


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


def compact_embedding(model: onnx.ModelProto, bits: int, tied: bool, block_size: int = INT4_BLOCK) -> dict:
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
        if head.op_type != "MatMulNBits" or attrs.get("bits") != bits or attrs.get("block_size") != block_size \
                or len(head.input) > 3:
            head = None  # a head kept fp32 or at other bits: the lookup gets its own table
    if head is None:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
                                 nodes_to_include=[gather.name])
        q.process()
        return {"embedding": f"GatherBlockQuantized, {bits} bits, own table"}
    table = gather.input[0]
    vocab, hidden = next(list(i.dims) for i in g.initializer if i.name == table)
    padded = -(-hidden // block_size) * block_size  # MatMulNBits pads each row to whole blocks
    shape = f"onnxgen/embedding_shape"
    g.initializer.append(numpy_helper.from_array(np.array([vocab, padded * bits // 8], np.int64), shape))
    packed = "onnxgen/embedding_packed"
    looked_up = list(gather.output) if padded == hidden else ["onnxgen/embedding_padded"]
    new = [helper.make_node("Reshape", [head.input[1], shape], [packed], name="/wte/Reshape"),
           helper.make_node("GatherBlockQuantized", [packed, gather.input[1], head.input[2]], looked_up,
                            name="/wte/GatherBlockQuantized", domain="com.microsoft", bits=bits,
                            block_size=block_size, gather_axis=0, quantize_axis=1)]
    if padded != hidden:  # a block that does not divide the width (576 at 128): drop the padding columns
        ends = "onnxgen/embedding_width"
        g.initializer.extend([numpy_helper.from_array(np.array([hidden], np.int64), ends),
                              numpy_helper.from_array(np.array([0], np.int64), "onnxgen/zero"),
                              numpy_helper.from_array(np.array([-1], np.int64), "onnxgen/last_axis")])
        new.append(helper.make_node("Slice", [looked_up[0], "onnxgen/zero", ends, "onnxgen/last_axis"],
                                    list(gather.output), name="/wte/Slice"))
    at = list(g.node).index(gather)
    g.node.remove(gather)
    for k, node in enumerate(new):
        g.node.insert(at + k, node)
    if not any(n.input and table in n.input for n in g.node):
        g.initializer.remove(next(i for i in g.initializer if i.name == table))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"embedding": f"GatherBlockQuantized, {bits} bits, shared with the tied head"}


def _grid(group: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None = None,
          fp16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `group` (rows of one block), the scale and zero point MLAS's round-to-nearest uses:
    symmetric, the value of largest magnitude maps to code 0 (scale may be negative, zero point 2^(bits-1));
    asymmetric, the range [min(w, 0), max(w, 0)] spread over every code.

    importance (rows,): search instead, per column, the range shrunk by one of GRID_SHRINK that rounds the
    block with the least importance-weighted squared error (the rows' Hessian diagonal: the energy of their
    inputs), as GPTQ's reference code (mse=True) and llama.cpp's importance-matrix quantizers do. Clipping
    the few largest weights buys a finer step for the rest.

    fp16: scales the file stores as fp16 (Recipe.scales), rounded so before the codes are chosen."""
    scale, zero = _range_grid(group, bits, symmetric, 1.0, fp16)
    if importance is None:
        return scale, zero
    maxq = (1 << bits) - 1

    def error(s, z):
        q = np.clip(np.round(group / s) + z, 0, maxq)
        return (importance[:, None] * (group - s * (q - z)) ** 2).sum(0)

    best = error(scale, zero)
    for shrink in GRID_SHRINK[1:]:
        s, z = _range_grid(group, bits, symmetric, shrink, fp16)
        err = error(s, z)
        better = err < best
        best, scale, zero = np.where(better, err, best), np.where(better, s, scale), np.where(better, z, zero)
    return scale, zero


GRID_SHRINK = np.linspace(1.0, 0.7, 13)  # the ranges _grid's search tries, as fractions of the full one (first)


def _range_grid(group: np.ndarray, bits: int, symmetric: bool, shrink: float,
                fp16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    maxq = (1 << bits) - 1
    if symmetric:
        idx = np.abs(group).argmax(0)
        extreme = group[idx, np.arange(group.shape[1])] * shrink
        scale = _stored(extreme / -(1 << (bits - 1)), fp16)
        scale[scale == 0] = 1.0
        return scale, np.full_like(scale, 1 << (bits - 1))
    lo, hi = np.minimum(group.min(0), 0) * shrink, np.maximum(group.max(0), 0) * shrink
    scale = _stored((hi - lo) / maxq, fp16)
    scale[scale == 0] = 1.0
    return scale, np.clip(np.round(-lo / scale), 0, maxq)


FP16_NORMAL = (float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max))


def _fits_fp16(scale: np.ndarray) -> np.ndarray:
    """Where a scale survives fp16 with its relative precision: 0, or a normal fp16 magnitude."""
    a = np.abs(scale)
    return (a == 0) | ((a >= FP16_NORMAL[0]) & (a <= FP16_NORMAL[1]))


def _stored(scale: np.ndarray, fp16: bool) -> np.ndarray:
    """`scale` as the file will hold it: rounded to fp16 where it fits (store_scales_fp16 keeps a tensor
    with any scale outside fp16's normal range at fp32, and these values are then exact in fp32 too)."""
    if not fp16:
        return scale
    return np.where(_fits_fp16(scale), scale.astype(np.float16).astype(scale.dtype), scale)


def gptq_weight(W: np.ndarray, H: np.ndarray, bits: int, group: int, symmetric: bool,
                percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False, grid_search: bool = False,
                fp16_scales: bool = False):
    """GPTQ (Frantar et al. 2022) of one (K, N) weight given the Hessian H = 2·XᵀX/n of its input X:
    rows (input channels) are quantized in order and each one's error is pushed onto the rows not yet
    quantized through the inverse Hessian's Cholesky factor. Written by hand: onnxruntime's gptq() does the
    same solve, but returns fake-quantized floats that gptq_quantize then re-rounds onto a fresh grid (for
    symmetric weights 16/15 of GPTQ's scale, undoing part of the gain); this returns the integer codes of
    the grid it solved on. Returns codes (N, K padded to blocks) uint8, scales (N, K/group) float32 and
    zero points (N, K/group) uint8.

    act_order: rows in order of decreasing Hessian diagonal (the inputs with the most energy first, while the
    most rows are left to absorb their error), GPTQ's "desc_act". A block's grid must still cover rows that
    are contiguous in the file (MatMulNBits' layout), so each grid is set once, from the weights before any
    update ("static groups").

    grid_search: each block's grid by _grid's search, weighted by the Hessian diagonal of its rows.
    fp16_scales: solve on the scales rounded as an fp16 file stores them (Recipe.scales)."""
    K, N = W.shape
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead] = 0
    kb = -(-K // group)
    maxq = (1 << bits) - 1
    scales, zeros = np.ones((kb, N)), np.zeros((kb, N))
    codes = np.zeros((kb * group, N), np.uint8)
    order = np.arange(K)
    energy = np.diag(H).copy() if grid_search else None  # _grid's weights, in the file's row order
    if act_order:
        for b in range(kb):
            rows = slice(b * group, (b + 1) * group)
            scales[b], zeros[b] = _grid(W[rows], bits, symmetric, None if energy is None else energy[rows],
                                        fp16_scales)
        order = np.argsort(-np.diag(H), kind="stable")
        W, H = W[order], H[order][:, order]
    H[np.diag_indices(K)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor
    blocksize = max(group, blocksize - blocksize % group)  # a group never straddles two blocks
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1, Hinv1 = W[i1:i2].copy(), np.zeros((i2 - i1, N)), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = order[i1 + i]  # the row's place in the file
            if not act_order and r % group == 0:
                scales[r // group], zeros[r // group] = _grid(W1[i:i + group], bits, symmetric,
                                                              None if energy is None else energy[r:r + group],
                                                              fp16_scales)
            s, z = scales[r // group], zeros[r // group]
            q = np.clip(np.round(W1[i] / s) + z, 0, maxq)
            codes[r] = q
            err = (W1[i] - s * (q - z)) / Hinv1[i, i]
            W1[i:] -= np.outer(Hinv1[i, i:], err)  # row i of the upper factor
            Err1[i] = err
        W[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    codes[K:] = zeros[-1].astype(np.uint8)  # padding rows of the last block: code = zero point, value 0
    return codes.T.copy(), scales.T.astype(np.float32), zeros.T.astype(np.uint8)


def _pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """(N, blocks) uint8 -> MatMulNBits' zero_points layout: per row, 4-bit values two to a byte (low
    nibble first, a row padded to whole bytes). Written by hand: weight_only's packer pads across rows
    when the number of blocks is odd (K 576 at block 64: 9 blocks)."""
    if bits == 8:
        return zeros
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.full((len(zeros), 1), 8, np.uint8)], 1)
    return (zeros[:, ::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


def text_windows(folder: Path, text: str, n: int, length: int, seed: int = 0) -> np.ndarray:
    """(≤ n, length) calibration windows: `text` tokenized with the export's tokenizer, cut into consecutive
    windows, n of them picked with `seed` (all of them when the text holds fewer)."""
    from pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(folder) / "tokenizer.json", require_eot=False)
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int64)
    count = len(ids) // length
    if count == 0:
        raise UserError(f"calibration text: {len(ids)} tokens, fewer than one window of {length}")
    pick = np.sort(np.random.default_rng(seed).permutation(count)[:n])
    return np.stack([ids[i * length:(i + 1) * length] for i in pick])


CALIBRATION_WINDOWS = 128  # GPTQ: windows of calibration text (seeded)
CALIBRATION_LENGTH = 256   # tokens per window (shorter when the context is)
CALIBRATION_SEED = 0


def calibration_data(folder: Path, text_file: str | Path | None, n: int, length: int,
                     checkpoint: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """(windows, what the manifest records) for GPTQ. From `text_file` when given; else from the export's
    recorded source: an import's corpus (its training split: parity judges on the held-out one), or a
    trained model's run (data/train.bin). The sha256 is of the text (or tokens) the windows were cut from."""
    import hashlib

    folder = Path(folder)
    source = manifest.load(folder).get("source") or {}
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise UserError(f"--calibration {path}: file does not exist")
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        windows = text_windows(folder, text, n, length, CALIBRATION_SEED)
        what = str(path)
    elif source.get("kind") in ("hf", "gguf"):
        from pipeline.train.corpus import load_corpus

        docs = load_corpus(source.get("corpus")).train
        order = np.random.default_rng(CALIBRATION_SEED).permutation(len(docs))
        picked, chars = [], 0
        for i in order:  # enough text for n windows (about 3 characters a token, twice over), not the whole corpus
            picked.append(docs[i])
            chars += len(docs[i])
            if chars >= 6 * n * length:
                break
        text = "\n\n".join(picked)
        data = text.encode("utf-8")
        windows = text_windows(folder, text, n, length, CALIBRATION_SEED)
        what = f"corpus {source.get('corpus') or 'stdlib'} (training split, {len(picked)} documents)"
    else:
        run = Path(checkpoint or source.get("checkpoint", ""))
        if not (run / "data" / "train.bin").is_file():
            raise UserError(f"--method gptq: no calibration text: pass --calibration TEXT_FILE (the source run's "
                            f"{run / 'data' / 'train.bin'} was not found)")
        tokens = read_tokens(run, "train").astype(np.int64)
        data = tokens.tobytes()
        count = len(tokens) // length
        pick = np.sort(np.random.default_rng(CALIBRATION_SEED).permutation(count)[:n])
        windows = np.stack([tokens[i * length:(i + 1) * length] for i in pick])
        what = f"{run / 'data' / 'train.bin'}"
    return windows, {"source": what, "sha256": hashlib.sha256(data).hexdigest(), "windows": int(len(windows)),
                     "window_length": int(windows.shape[1]), "seed": CALIBRATION_SEED}


def hessians(model: onnx.ModelProto, activations: list[str], windows: np.ndarray, progress: bool,
             batch: int = 4) -> dict[str, np.ndarray]:
    """{activation: 2·XᵀX/n} over every token of `windows` (n, T), from one run of the fp32 graph per batch
    with the activations as extra outputs. Written by hand: onnxruntime's gptq_quantize runs the whole
    model once per activation and per window (121 activations in SmolLM2-135M: 121x the forwards)."""
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    del aug.graph.output[:]
    aug.graph.output.extend([helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None) for a in activations])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(aug.SerializeToString(), options, providers=["CPUExecutionProvider"])
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    H = {a: None for a in activations}
    n = 0
    bar = tqdm(total=len(windows), desc="calibrating (GPTQ)", unit="window", disable=not progress)
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch].astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
        feed.update({p.name: np.zeros((len(ids), p.shape[1], 0, p.shape[3]), np.float32) for p in past})
        outs = session.run(activations, feed)
        for a, x in zip(activations, outs):
            x = x.reshape(-1, x.shape[-1])
            xx = (x.T @ x).astype(np.float64)  # fp32 products (BLAS), summed per batch into fp64
            H[a] = xx if H[a] is None else H[a] + xx
        n += ids.size
        bar.update(len(ids))
    bar.close()
    return {a: 2 * h / n for a, h in H.items()}


def matmul_nbits(node, shape: tuple[int, int], codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None,
                 bits: int, group: int, accuracy_level: int):
    """(MatMulNBits node, its initializers) for MatMul `node` whose (K, N) weight is codes (N, K padded),
    scales (N, blocks) and zero points (N, blocks; None: symmetric, the op's default 2^(bits-1)). The
    packing of codes and scales is onnxruntime's (weight_only.make_matmul_weight_only_node); zero points
    are packed here (_pack_zero_points)."""
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    K, N = shape
    kb = scales.shape[1]
    q_node, new = make_matmul_weight_only_node(node, (K, N), bits, group, kb, codes.reshape(N * kb, group),
                                               scales.reshape(-1).astype(np.float32), None, accuracy_level)
    if zeros is not None:
        zp = numpy_helper.from_array(_pack_zero_points(zeros, bits), node.input[1] + "_zp")
        new.append(zp)
        q_node.input.append(zp.name)
    return q_node, new


def gptq_quantize(model: onnx.ModelProto, nodes: list[str], windows: np.ndarray, recipe: "Recipe",
                  progress: bool, hessian_cache: dict | None = None, head: str | None = None) -> None:
    """Replace each MatMul in `nodes` by a MatMulNBits holding its GPTQ solution (in place); `head`, when
    one of them, is solved symmetric at recipe.head_block_size (see Recipe.head).
    hessian_cache: a dict kept by a caller that quantizes the same graph on the same windows again."""
    import hashlib

    g = model.graph
    by_name = {n.name: n for n in g.node}
    acts = sorted({by_name[n].input[0] for n in nodes})
    key = (hashlib.sha256(windows.astype(np.int64).tobytes()).hexdigest(), tuple(acts))
    if hessian_cache is not None and key in hessian_cache:
        H = hessian_cache[key]
    else:
        H = hessians(model, acts, windows, progress)
        if hessian_cache is not None:
            hessian_cache.clear()
            hessian_cache[key] = H
    inits = {i.name: i for i in g.initializer}
    bits = recipe.bits
    for name in tqdm(nodes, desc="GPTQ", unit="matmul", disable=not progress):
        node = by_name[name]
        W = numpy_helper.to_array(inits[node.input[1]])
        group, symmetric = (recipe.head_block_size, True) if name == head else (recipe.block_size, recipe.symmetric)
        codes, scales, zeros = gptq_weight(W, H[node.input[0]], bits, group, symmetric, act_order=recipe.act_order,
                                           grid_search=recipe.grid_search, fp16_scales=recipe.scales == "fp16")
        q_node, new = matmul_nbits(node, W.shape, codes, scales, None if symmetric else zeros,
                                   bits, group, recipe.accuracy_level)
        g.initializer.extend(new)
        at = list(g.node).index(node)
        g.node.remove(node)
        g.node.insert(at, q_node)
        if not any(node.input[1] in n.input for n in g.node):
            g.initializer.remove(inits[node.input[1]])


def quantize_weights(src: Path, dst: Path, recipe: Recipe, calibration: np.ndarray | None = None,
                     progress: bool = False, hessian_cache: dict | None = None) -> dict:
    """The fused fp32 graph `src` -> `dst` with every weight MatMul a MatMulNBits per `recipe` (the head
    as recipe.head says) and the embedding lookup sharing a tied head's table. `calibration`: (n, T) token
    windows, for GPTQ. Returns the manifest's details: the recipe and the bits each tensor got."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if recipe.method not in METHODS:
        raise UserError(f"--method {recipe.method}: expected one of {', '.join(METHODS)}")
    model = onnx.load(str(src))
    tied = _is_tied(model)
    head = _head_matmul(model)
    plan = plan_bits(model, recipe)
    fp32 = select(model, recipe.fp32_compute)
    body4 = [n for n, b in plan.items() if b == 4 and n != head]
    solved = body4 + [head] * recipe.gptq_head if recipe.method == "gptq" else []
    if solved:
        if calibration is None or not len(calibration):
            raise UserError("--method gptq: needs calibration text (--calibration)")
        gptq_quantize(model, solved, calibration, recipe, progress, hessian_cache, head=head)
    groups = []  # (nodes, bits, symmetric, algo_config, block size)
    if recipe.method == "hqq" and body4:
        groups.append((body4, 4, False, HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=4),
                       recipe.block_size))
    elif recipe.method == "rtn" and body4:
        groups.append((body4, 4, recipe.symmetric, None, recipe.block_size))
    eight = [n for n, b in plan.items() if b == 8 and n != head]
    if eight:
        groups.append((eight, 8, True, None, recipe.block_size))
    if plan[head] and head not in solved:  # the head (and a tied embedding): symmetric RTN, its own block size
        groups.append(([head], plan[head], True, None, recipe.head_block_size))
    for nodes, bits, symmetric, algo, block in groups:
        others = [n for n in _weight_matmuls(model) if n not in nodes]
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                 accuracy_level=recipe.accuracy_level, nodes_to_exclude=others, algo_config=algo)
        q.process()
        model = q.model.model
    for node in model.graph.node:  # HQQ and GPTQ nodes carry no accuracy_level of their own
        if node.op_type == "MatMulNBits":
            level = 0 if any(node.name.startswith(n) for n in fp32) else recipe.accuracy_level
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("accuracy_level", level))
    left = [n for n in _weight_matmuls(model) if n != head]
    assert not left, f"quantize: MatMuls left unquantized: {left}"
    table = compact_embedding(model, plan[head] or 4, tied, recipe.head_block_size)
    stored = {"fp16_scales": store_scales_fp16(model)} if recipe.scales == "fp16" else {}
    onnx.save(model, str(dst))
    counts = {}
    for b in plan.values():
        counts[str(b or 32)] = counts.get(str(b or 32), 0) + 1
    blocks = {}
    for n, b in plan.items():
        if n != head and _block_of(n) is not None:
            blocks.setdefault(_block_of(n), []).append(b)
    eight_bit_blocks = sorted(k for k, bs in blocks.items() if all(b == 8 for b in bs)) if recipe.bits == 4 else []
    return {**recipe.summary(), "matmuls_by_bits": counts, "eight_bit_blocks": eight_bit_blocks,
            "bits_per_tensor": {n: b for n, b in plan.items()}, **table, **stored}


def store_scales_fp16(model: onnx.ModelProto) -> dict:
    """Every fp32 scale table of a MatMulNBits or GatherBlockQuantized stored as fp16, with a Cast back to
    the fp32 the op takes in an fp32 graph (in place). onnxruntime folds the Casts when it loads the session
    (basic optimizations, before the kernels pack their weights), so the kernels see what they saw before,
    minus the rounding. A table with any scale outside fp16's normal range stays fp32. Written by hand:
    onnxruntime's quantizers write scales in the graph's float type and have no option for this.
    Returns {"tensors": converted, "kept_fp32": kept} for the manifest."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    tables = sorted({n.input[2] for n in g.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
                     and len(n.input) > 2 and n.input[2] in inits
                     and inits[n.input[2]].data_type == onnx.TensorProto.FLOAT})
    converted, kept = 0, 0
    for name in tables:
        scale = numpy_helper.to_array(inits[name])
        if not _fits_fp16(scale).all():
            kept += 1
            continue
        g.initializer.remove(inits[name])
        g.initializer.append(numpy_helper.from_array(scale.astype(np.float16), name + "_fp16"))
        g.node.insert(converted, helper.make_node("Cast", [name + "_fp16"], [name], name=name + "/Cast",
                                                  to=onnx.TensorProto.FLOAT))
        converted += 1
    return {"tensors": converted, "kept_fp32": kept}


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


def quantize_int8_blockwise(src: Path, dst: Path, recipe: "Recipe | None" = None) -> dict:
    """Weight-only int8 MatMulNBits (bits=8, block 32): with accuracy_level 4 the kernel quantizes the
    activations per block of 32 per row, not per tensor, so one outlier channel costs its block only
    and a row's result does not depend on the other rows in the batch."""
    recipe = recipe or DEFAULT_RECIPES["trained"]["int8"]
    return {"int8_mode": "blockwise", **quantize_weights(src, dst, recipe)}


def _block_of(node_name: str) -> int | None:
    """The transformer block a weight MatMul belongs to, from the exporters' node names
    (/h.3/mlp/c_fc/MatMul ours and GPT-2's, /model/layers.3/... Llama-style), or None."""
    m = re.search(r"/(?:h|layers)\.(\d+)/", node_name)
    return int(m.group(1)) if m else None


def quantize_int4(src: Path, dst: Path, head: str = DEFAULT_HEAD, recipe: "Recipe | None" = None,
                  calibration: np.ndarray | None = None, progress: bool = False) -> dict:
    """4-bit MatMulNBits per `recipe` (default: the trained models' recipe, below), the LM head at `head`.
    The trained models' recipe gives the first and last blocks of models of more than two blocks 8 bits
    (as llama.cpp's K-quants give their most sensitive tensors more bits). Measured on the fully trained
    `small` (900 steps), top-1 against PyTorch: every block 4-bit 96.39% (misses 97%; asymmetric 96.97%,
    HQQ 96.97%, block 16 96.29%, only c_attn 8-bit 97.46%); first and last blocks 8-bit 98.34%, greedy
    64/64, for 0.8 MB more (13.87 vs 13.08 MB)."""
    recipe = recipe or replace(DEFAULT_RECIPES["trained"]["int4"], head=head)
    return quantize_weights(src, dst, recipe, calibration=calibration, progress=progress)


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
def recipe_for(folder: Path, variant: str, preset: str = "default", **overrides) -> Recipe:
    """The default recipe of `variant` for this export (an import's or a trained model's), made the fast one
    (FAST_INT4, int4 only) when `preset` is "fast", with the options given (not None) replacing its fields."""
    if preset not in RECIPE_PRESETS:
        raise UserError(f"--recipe {preset}: expected one of {', '.join(RECIPE_PRESETS)}")
    kind = (manifest.load(folder).get("source") or {}).get("kind")
    base = DEFAULT_RECIPES["import" if kind in ("hf", "gguf") else "trained"][variant]
    if preset == "fast" and variant == "int4":
        base = replace(base, **FAST_INT4)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "eight_bit" in given:
        given["eight_bit"] = tuple(x for x in given["eight_bit"] if x and x != "none")
    recipe = replace(base, **given)
    if recipe.bits == 8:  # 8-bit tensors are always round to nearest (symmetric): --method is int4's
        recipe = replace(recipe, method="rtn", symmetric=True)
    if recipe.method not in METHODS:
        raise UserError(f"--method {recipe.method}: expected one of {', '.join(METHODS)}")
    if recipe.block_size not in (16, 32, 64, 128, 256):
        raise UserError(f"--block-size {recipe.block_size}: expected a power of two from 16 to 256")
    if recipe.scales not in SCALES:
        raise UserError(f"--scales {recipe.scales}: expected one of {', '.join(SCALES)}")
    if recipe.head_block not in (0, 16, 32, 64, 128, 256):
        raise UserError(f"--head-block-size {recipe.head_block}: expected a power of two from 16 to 256")
    return recipe


def quantize(folder: str | Path, variant: str, int8_mode: str = DEFAULT_INT8_MODE, head: str | None = None,
             checkpoint: str | Path | None = None, progress: bool = True, method: str | None = None,
             block_size: int | None = None, symmetric: bool | None = None, accuracy_level: int | None = None,
             eight_bit: tuple[str, ...] | None = None, calibration: str | Path | None = None,
             calibration_windows: int = CALIBRATION_WINDOWS, head_block: int | None = None,
             act_order: bool | None = None, grid_search: bool | None = None, scales: str | None = None,
             recipe: str = "default") -> dict:
    """The quantize stage: add or rebuild `variant` ("int8", "int4", "fp16" or "all") from onnx/model.onnx.
    int4 and blockwise int8 follow the export's default recipe (DEFAULT_RECIPES; `recipe="fast"`: int4's
    FAST_INT4) with the options given replacing its fields; GPTQ calibrates on `calibration` (a text file;
    default: the export's recorded corpus or run). Each file is renamed into place whole and recorded in the
    manifest (with its recipe). Returns {variant: details}."""
    folder = Path(folder)
    if variant not in (*QUANTIZED, "all"):
        raise UserError(f"--variant {variant}: expected one of {', '.join(QUANTIZED)} or all")
    if int8_mode not in INT8_MODES:
        raise UserError(f"--int8-mode {int8_mode}: expected one of {', '.join(INT8_MODES)}")
    if head is not None and head not in HEADS:
        raise UserError(f"--head {head}: expected one of {', '.join(HEADS)}")
    fp32 = variant_path(folder, "fp32")
    if not fp32.is_file():
        raise UserError(f"export {folder}: {fp32} does not exist (run `onnxgen export` first)")
    options = dict(method=method, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
                   eight_bit=eight_bit, head_block=head_block, act_order=act_order, grid_search=grid_search,
                   scales=scales)
    recipes = {"int4": recipe_for(folder, "int4", recipe, head=head, **options),
               "int8": recipe_for(folder, "int8", **options)}
    run = None
    if int8_mode == "static" and variant in ("int8", "all"):
        run = Path(checkpoint or (manifest.load(folder).get("source") or {}).get("checkpoint", ""))
        if not (run / "data" / "valid.bin").is_file():
            raise UserError(f"--int8-mode static: needs the source run's held-out split ({run / 'data' / 'valid.bin'}"
                            f" not found); pass --checkpoint RUN")
    shape = read_config(folder)
    todo = QUANTIZED if variant == "all" else (variant,)
    windows, calibration_info = None, None
    gptq = [v for v in todo if v in recipes and (v != "int8" or int8_mode == "blockwise") and recipes[v].method == "gptq"]
    if calibration is not None and not gptq:  # given for nothing: say so rather than quantize as if it had counted
        raise UserError(f"--calibration {calibration}: only GPTQ calibrates, and no variant this command writes uses "
                        f"it ({', '.join(f'{v}: {recipes[v].method}' for v in todo if v in recipes) or variant}); "
                        f"add --method gptq or leave --calibration out")
    if gptq:
        windows, calibration_info = calibration_data(folder, calibration, calibration_windows,
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
                {"preset": recipe, **quantize_int4(s, d, recipes["int4"].head, recipe=recipes["int4"],
                                                   calibration=windows, progress=progress)}, recipes["int4"]),
            "fp16": convert_fp16,
        }
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
    if follow_replaced_twin(folder, variant):
        log.warning("quantize: genai_config.json named the fused twin of %s, which the new graph replaces: it "
                    "now names onnx/%s (onnxgen fuse, then onnxgen genai --fused, to go back)", variant, final.name)
    log.info("quantize: wrote onnx/%s (%.2f MB)", final.name, size / 1e6)
    return details
