from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.convert.quantize.recipe import KINDS, Recipe
from pipeline.errors import UserError
from pipeline.exports import check_structure, initializer_array, materialize, read_graph_only


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
    head = head_matmul(model)
    weights = weight_matmuls(model)
    blocks = {n: block_of(n) for n in weights}
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
    head = head_matmul(model)
    eight = select(model, recipe.eight_bit)
    plan = {n: (8 if n in eight or recipe.bits == 8 else recipe.bits) for n in weight_matmuls(model) if n != head}
    plan[head] = {"int4": 4, "int8": 8, "fp32": None}[recipe.head]
    return plan


def weight_matmuls(model: onnx.ModelProto, routers: bool = False) -> list[str]:
    """MatMuls whose second input is a constant initializer: the ones to quantize (not Q·Kᵀ, P·V), but the
    experts' routers (fp32: quantize/experts.py), which routers=True lists as well."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and (routers or "/mlp/router/" not in n.name)]


def head_matmul(model: onnx.ModelProto) -> str:
    """The MatMul whose output feeds the `logits` output (possibly through a Cast, a bias, a divisor or a
    soft-cap: each step back follows the input a node computes, not a constant)."""
    produced = {o: n for n in model.graph.node for o in n.output}
    node = produced["logits"]
    while node.op_type != "MatMul":
        node = produced[next(x for x in node.input if x in produced and produced[x].op_type != "Constant")]
    return node.name


def _embedding_gather(model: onnx.ModelProto):
    """The Gather of input_ids from a (V, C) initializer: the token embedding."""
    inits = {i.name for i in model.graph.initializer}
    return next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and n.input[1] == "input_ids"), None)


def is_tied(model: onnx.ModelProto, src: Path | None = None) -> bool:
    """The LM head's weight is the embedding transposed (a tied head: GPT-2, SmolLM2, ...). `src`: the file of a
    graph read by read_graph_only, the two read from it."""
    inits = {i.name: i for i in model.graph.initializer}
    gather, head = _embedding_gather(model), next(n for n in model.graph.node if n.name == head_matmul(model))
    if gather is None or head.input[1] not in inits:
        return False
    table, weight = inits[gather.input[0]], inits[head.input[1]]
    if list(table.dims)[::-1] != list(weight.dims):
        return False
    table = initializer_array(table, src)
    weight = initializer_array(weight, src)
    step = max(1, (64 << 20) // max(1, table.strides[0]))  # in slices: no whole-table boolean temporary
    return all(np.array_equal(table[i:i + step].T, weight[:, i:i + step]) for i in range(0, len(table), step))


def compact_embedding(model: onnx.ModelProto, bits: int, tied: bool, block_size: int,
                      src: Path | None = None) -> dict:
    """The embedding lookup quantized with the weights: a com.microsoft GatherBlockQuantized (blocks of
    `block_size` along the hidden axis, symmetric, `bits` bits). A tied head's MatMulNBits already holds the
    same table quantized the same way, (V, C/block, block*bits/8) bytes and (V, C/block) scales, so the lookup
    reads those through a Reshape and the file carries the table once (as onnxruntime-genai's builder does).
    Written by hand: onnxruntime's MatMulNBitsQuantizer quantizes a Gather on its own (a second copy of a tied
    table), and nothing in it shares one. `src`: as is_tied's. Returns what it did, for the manifest."""
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
        # the quantizer takes every Gather of a constant table (GPT-2's positions too): those tables are read
        # now when the graph was read by read_graph_only
        tables = {n.input[0] for n in g.node if n.op_type == "Gather"}
        for t in g.initializer:
            if t.name in tables and t.data_location == onnx.TensorProto.EXTERNAL:
                materialize(t, src)
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
                                 nodes_to_include=[gather.name])
        q.process()
        return {"embedding": f"GatherBlockQuantized, {bits} bits, own table"}
    table = gather.input[0]
    vocab, hidden = next(list(i.dims) for i in g.initializer if i.name == table)
    padded = -(-hidden // block_size) * block_size  # MatMulNBits pads each row to whole blocks
    shape = "onnxgen/embedding_shape"
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


def _pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """(N, blocks) uint8 -> MatMulNBits' zero_points layout: per row, 4-bit values two to a byte (low
    nibble first, a row padded to whole bytes). Written by hand: weight_only's packer pads across rows
    when the number of blocks is odd (K 576 at block 64: 9 blocks)."""
    if bits == 8:
        return zeros
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.full((len(zeros), 1), 8, np.uint8)], 1)
    return (zeros[:, ::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


def replace_matmul(g, node, new_nodes: list, new_initializers, inits: dict) -> None:
    """MatMul `node` of graph `g` replaced, where it stands, by `new_nodes` reading `new_initializers`; its weight
    (in `inits`, name -> TensorProto) goes once no node reads it (a tied table's Gather still may)."""
    g.initializer.extend(new_initializers)
    at = list(g.node).index(node)
    g.node.remove(node)
    for k, n in enumerate(new_nodes):
        g.node.insert(at + k, n)
    weight = node.input[1]
    if not any(weight in n.input for n in g.node):
        g.initializer.remove(inits.pop(weight))


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


def block_of(node_name: str) -> int | None:
    """The transformer block a weight MatMul belongs to, from the exporters' node names
    (/h.3/mlp/c_fc/MatMul ours and GPT-2's, /model/layers.3/... Llama-style), or None."""
    m = re.search(r"/(?:h|layers)\.(\d+)/", node_name)
    return int(m.group(1)) if m else None


def drop_duplicate_casts(graph) -> None:
    """Written by hand for a converter bug: with an op_block_list, convert_float_to_float16 gives a
    tensor that feeds two blocked nodes one identical Cast per consumer, all with the same output name
    (a graph that is no longer single-assignment; seen on optimum's GPT-2 graph). Keep the first."""
    seen = set()
    for node in list(graph.node):
        if node.op_type == "Cast" and node.output[0] in seen:
            graph.node.remove(node)
        seen.update(node.output)


# onnxruntime's ops that it registers in the ONNX domain itself (onnxruntime.transformers' RMSNorm fusion
# writes one; so does onnxruntime-genai's builder): onnx.checker has no schema for them
ORT_OPS_IN_ONNX_DOMAIN = {"SimplifiedLayerNormalization"}


def check_graph(path: Path) -> None:
    """onnx.checker on a variant, with the ops above taken as the contrib ops they are (a domain onnx does
    not know is not checked) and every other node checked as usual."""
    model = read_graph_only(path)  # the structure: the weights are ONNX Runtime's to read
    for node in model.graph.node:
        if node.domain == "" and node.op_type in ORT_OPS_IN_ONNX_DOMAIN:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    check_structure(model)


FP16_NORMAL = (float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max))


def _fits_fp16(scale: np.ndarray) -> np.ndarray:
    """Where a scale survives fp16 with its relative precision: 0, or a normal fp16 magnitude."""
    a = np.abs(scale)
    return (a == 0) | ((a >= FP16_NORMAL[0]) & (a <= FP16_NORMAL[1]))


def stored(scale: np.ndarray, fp16: bool) -> np.ndarray:
    """`scale` as the file will hold it: rounded to fp16 where it fits (store_scales_fp16 keeps a tensor
    with any scale outside fp16's normal range at fp32, and these values are then exact in fp32 too)."""
    if not fp16:
        return scale
    return np.where(_fits_fp16(scale), scale.astype(np.float16).astype(scale.dtype), scale)
