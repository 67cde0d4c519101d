from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from pipeline.convert.quantize.calibration import Windows, calibration_windows
from pipeline.convert.quantize.experts import quantize_experts
from pipeline.convert.quantize.gptq import gptq_hessians, gptq_quantize, hessian_groups
from pipeline.convert.quantize.graph import (
    block_of,
    compact_embedding,
    drop_duplicate_casts,
    head_matmul,
    is_tied,
    plan_bits,
    replace_matmul,
    select,
    store_scales_fp16,
    weight_matmuls,
)
from pipeline.convert.quantize.recipe import DEFAULT_RECIPES, Recipe
from pipeline.errors import UserError
from pipeline.exports import (StoredArray, held_apart, load_graph, materialize, read_graph_only, release_memory,
                              save_graph_streamed)
from pipeline.train.runs import load_model

FP32_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization")  # kept fp32 in the fp16 variant
# Qwen3.5's Gated DeltaNet: its recurrent state (past_recurrent.*, present_recurrent.*) is float32 in every
# variant (the recurrence is where half precision hurts most), and so is the LinearAttention node that
# carries it, its q, k, v and gates with it
FP32_STATE_OPS = ("LinearAttention", "GatedDeltaNet")  # their state is float only
STATE_FP32 = ("past_recurrent.", "present_recurrent.", "past_ssm.", "present_ssm.")


def quantize_weights(src: Path, dst: Path, recipe: Recipe, calibration: np.ndarray | None = None,
                     progress: bool = False, hessian_cache: dict | None = None) -> dict:
    """The fused fp32 graph `src` -> `dst` with every weight MatMul a MatMulNBits per `recipe` (the head
    as recipe.head says) and the embedding lookup sharing a tied head's table. `calibration`: (n, T) token
    windows, for GPTQ. Returns the manifest's details: the recipe and the bits each tensor got.

    Memory: the graph is held without its weights (read_graph_only); each weight is read from src's file when
    its MatMul is quantized and only its quantized form stays, and what stays fp32 is written from the file
    (save_graph_streamed). Holding the fp32 model instead cost its whole size beside the Hessians, and protobuf
    keeps a replaced tensor's bytes until the model goes (benchmarks/MEMORY_NOTES.md)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    model = read_graph_only(src)
    head = head_matmul(model)
    plan = plan_bits(model, recipe)
    fp32 = select(model, recipe.fp32_compute)
    body4 = [n for n, b in plan.items() if b == 4 and n != head]
    solved = body4 + [head] * recipe.gptq_head if recipe.method == "gptq" else []
    if solved and (calibration is None or not len(calibration)):
        raise UserError("--method gptq: needs calibration text (--calibration)")
    tied = is_tied(model, src)
    # GPTQ's Hessians are calibrated on the fp32 graph (its structure as read, not the one being quantized), a
    # run of MatMuls at a time (hessian_groups: one for models whose Hessians fit HESSIAN_BYTES)
    calibrated = read_graph_only(src) if solved else None
    for nodes in hessian_groups(calibrated, solved) if solved else []:
        H = gptq_hessians(src, calibrated, nodes, calibration, progress, hessian_cache)
        gptq_quantize(model, nodes, H, recipe, progress, head=head, src=src)
        del H
        release_memory()
    del calibrated
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
        quantize_nodes(model, src, nodes, bits, block, symmetric, recipe.accuracy_level, algo)
    for node in model.graph.node:  # HQQ and GPTQ nodes carry no accuracy_level of their own
        if node.op_type == "MatMulNBits":
            level = 0 if any(node.name.startswith(n) for n in fp32) else recipe.accuracy_level
            for a in list(node.attribute):
                if a.name == "accuracy_level":
                    node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("accuracy_level", level))
    left = [n for n in weight_matmuls(model) if n != head]
    assert not left, f"quantize: MatMuls left unquantized: {left}"
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # the experts' weights, quantized whole (quantize/experts.py)
        if node.op_type == "MoE":
            for name in node.input[2:]:
                if name in inits and inits[name].data_location == onnx.TensorProto.EXTERNAL:
                    materialize(inits[name], src)
    experts = quantize_experts(model, recipe.bits, recipe.block_size)
    table = compact_embedding(model, plan[head] or 4, tied, recipe.head_block_size, src)
    stored = {"fp16_scales": store_scales_fp16(model)} if recipe.scales == "fp16" else {}
    save_graph_streamed(*held_apart(model, src), dst)
    counts = {}
    for b in plan.values():
        counts[str(b or 32)] = counts.get(str(b or 32), 0) + 1
    blocks = {}
    for n, b in plan.items():
        if n != head and block_of(n) is not None:
            blocks.setdefault(block_of(n), []).append(b)
    eight_bit_blocks = sorted(k for k, bs in blocks.items() if all(b == 8 for b in bs)) if recipe.bits == 4 else []
    return {**recipe.summary(), "matmuls_by_bits": counts, "eight_bit_blocks": eight_bit_blocks,
            "bits_per_tensor": {n: b for n, b in plan.items()}, **table, **stored, **experts}


def quantize_nodes(model: onnx.ModelProto, src: Path, nodes: list[str], bits: int, block: int, symmetric: bool,
                   accuracy_level: int, algo=None) -> None:
    """The MatMuls `nodes` of `model` (read by read_graph_only from `src`) -> MatMulNBits through onnxruntime's
    weight-only quantizer (its default, or `algo`: HQQ), in place. MatMulNBitsQuantizer.process quantizes a
    whole model held with its weights; here its node quantizer is given one node at a time, with that node's
    weight alone read from the file into a graph of its own (what process does per node, over a graph stack)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, algo_config=algo).node_quantizer
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_name = {n.name: n for n in g.node}
    for name in nodes:
        node = by_name[name]
        weight = node.input[1]
        alone = onnx.GraphProto()
        alone.initializer.add().CopyFrom(inits[weight])
        if alone.initializer[0].data_location == onnx.TensorProto.EXTERNAL:
            materialize(alone.initializer[0], src)
        new = quantizer.quantize(node, [alone])
        replace_matmul(g, node, new, [t for t in alone.initializer if t.name != weight], inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def quantize_int8_dynamic(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_graph(src)
    nodes = weight_matmuls(model)
    experts = quantize_experts(model, 8, 0)
    quantize_dynamic(model, str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                     extra_options={"MatMulConstBOnly": True})
    return {"method": "DynamicQuantizeMatMul", "int8_mode": "dynamic", "per_channel": True, "weight_type": "int8",
            "matmuls": len(nodes), **experts}


def quantize_int8_static(src: Path, dst: Path, run: Path, progress: bool) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    c = load_model(run).config
    windows = calibration_windows(run, c.n_ctx)
    model = load_graph(src)
    nodes = weight_matmuls(model)
    experts = quantize_experts(model, 8, 0)
    reader = Windows(windows, c.n_layer, c.n_head, c.head_dim, progress)
    # uint8 activations and int8 weights: the pairing ONNX Runtime recommends for CPU (VNNI/AVX2 kernels)
    quantize_static(model, str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=nodes, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"MatMulConstBOnly": True})
    return {"method": "QDQ", "int8_mode": "static", "per_channel": True, "calibration": "MinMax",
            "calibration_windows": int(len(windows)), "window_length": int(windows.shape[1]),
            "matmuls": len(nodes), **experts}


def quantize_int4(src: Path, dst: Path, recipe: Recipe | None = None, calibration: np.ndarray | None = None,
                  progress: bool = False) -> dict:
    """4-bit MatMulNBits per `recipe` (default: the trained models' recipe, below), the LM head at recipe.head.
    The trained models' recipe gives the first and last blocks of models of more than two blocks 8 bits
    (as llama.cpp's K-quants give their most sensitive tensors more bits). Measured on the fully trained
    `small` (900 steps), top-1 against PyTorch: every block 4-bit 96.39% (misses 97%; asymmetric 96.97%,
    HQQ 96.97%, block 16 96.29%, only c_attn 8-bit 97.46%); first and last blocks 8-bit 98.34%, greedy
    64/64, for 0.8 MB more (13.87 vs 13.08 MB)."""
    recipe = recipe or DEFAULT_RECIPES["trained"]["int4"]
    return quantize_weights(src, dst, recipe, calibration=calibration, progress=progress)


def convert_fp16(src: Path, dst: Path) -> dict:
    from unittest import mock

    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # the graph's structure only (its weights stay in the file, declared external where they lie): the converter
    # decides from the nodes alone which initializers turn fp16 and only flips their type, and each weight is
    # converted when it is written, one at a time (converting in memory held the fp32 model, the fp16 one and
    # the converter's whole-tensor temporaries together: 5.6 GB for Gemma 3 270M's 1.07 GB of weights)
    structure = read_graph_only(src)
    stored = {t.name: (onnx.TensorProto.FromString(t.SerializeToString()), t.data_type)
              for t in structure.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    model = OnnxModel(structure)
    # keep_io_types=["logits"]: the logits output stays fp32 (the contract), past/present go fp16.
    # LayerNorms stay fp32 (their mean and variance lose most in half precision; the weights are tiny):
    # measured on the fully trained `small`, all-fp16 max |Δlogit| 1.45e-2 (misses 1e-2), LayerNorms
    # fp32 7.8e-3 at the same size; the head in fp32 instead gave 1.27e-2 for 4 MB more.
    # the recurrent states stay fp32 (Qwen3.5's past_recurrent, Granite 4's past_ssm: their ops take only a float
    # state, and the recurrence is where half precision hurts most): the graph's inputs and outputs, and the ops
    graph = model.model.graph
    states = [v.name for v in [*graph.input, *graph.output] if v.name.startswith(STATE_FP32)]
    blocked = list(FP32_OPS) + [op for op in FP32_STATE_OPS if any(n.op_type == op for n in graph.node)]
    # the optimize stage typed every tensor (convert/optimize.py's _record_types, with the weights aside), which
    # is all the conversion needs: so no shape inference here, which would copy the whole model with its
    # weights (OnnxModel.convert_float_to_float16 runs it: 0.6 GB of SmolLM2's quantize peak) and does not
    # know the state ops. What that wrapper does after converting is done the same below.
    # the converter types each turned initializer by reading it whole (make_value_info_from_tensor calls
    # numpy_helper.to_array for its shape, from the working directory): given the same from its dims here
    with mock.patch.object(float16, "make_value_info_from_tensor",
                           lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))):
        model.initialize(float16.convert_float_to_float16(model.model, disable_shape_infer=True,
                                                          keep_io_types=["logits", *states], op_block_list=blocked))
    # the Casts' types come from the value_info the optimize stage and the converter wrote: the symbolic shape
    # inference remove_useless_cast_nodes would try first cannot read weights left in the file (it printed
    # "failed in shape inference" and went on with the value_info alone)
    model.disable_shape_inference()
    model.remove_cascaded_cast_nodes()
    model.remove_useless_cast_nodes()
    drop_duplicate_casts(model.model.graph)
    model.topological_sort()
    out, weights = held_apart(model.model, src)
    for name, (header, was) in stored.items():  # those the converter turned: read as stored, written as fp16
        if was == onnx.TensorProto.FLOAT and weights[name].stored == np.float16:
            weights[name] = StoredArray(header, src, np.float16, float16.convert_np_to_float16)
    save_graph_streamed(out, weights, dst)
    info = {"method": "float16", "logits": "fp32", "past": "fp16", "fp32_ops": blocked}
    return {**info, "state": "fp32", "fp32_state": states} if states else info
