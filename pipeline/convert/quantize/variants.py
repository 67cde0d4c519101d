from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from pipeline.convert.quantize.calibration import Windows, calibration_windows
from pipeline.convert.quantize.experts import quantize_experts
from pipeline.convert.quantize.gptq import gptq_hessians, gptq_quantize
from pipeline.convert.quantize.graph import (
    block_of,
    compact_embedding,
    drop_duplicate_casts,
    head_matmul,
    is_tied,
    plan_bits,
    select,
    store_scales_fp16,
    weight_matmuls,
)
from pipeline.convert.quantize.recipe import DEFAULT_RECIPES, Recipe
from pipeline.errors import UserError
from pipeline.exports import load_graph, release_memory
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
    windows, for GPTQ. Returns the manifest's details: the recipe and the bits each tensor got."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # the plan from the graph's structure; GPTQ's calibration runs before the weights are loaded into Python
    # (gptq.hessians: ONNX Runtime alone holds them then)
    graph = onnx.load(str(src), load_external_data=False)
    head = head_matmul(graph)
    plan = plan_bits(graph, recipe)
    fp32 = select(graph, recipe.fp32_compute)
    body4 = [n for n, b in plan.items() if b == 4 and n != head]
    solved = body4 + [head] * recipe.gptq_head if recipe.method == "gptq" else []
    H = None
    if solved:
        if calibration is None or not len(calibration):
            raise UserError("--method gptq: needs calibration text (--calibration)")
        H = gptq_hessians(src, graph, solved, calibration, progress, hessian_cache)
    del graph
    release_memory()
    model = load_graph(src)
    tied = is_tied(model)
    if solved:
        gptq_quantize(model, solved, H, recipe, progress, head=head)
        del H
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
        others = [n for n in weight_matmuls(model, routers=True) if n not in nodes]
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
    left = [n for n in weight_matmuls(model) if n != head]
    assert not left, f"quantize: MatMuls left unquantized: {left}"
    experts = quantize_experts(model, recipe.bits, recipe.block_size)
    table = compact_embedding(model, plan[head] or 4, tied, recipe.head_block_size)
    stored = {"fp16_scales": store_scales_fp16(model)} if recipe.scales == "fp16" else {}
    onnx.save(model, str(dst))
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
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(load_graph(src))
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
    model.initialize(convert_float_to_float16(model.model, disable_shape_infer=True,
                                              keep_io_types=["logits", *states], op_block_list=blocked))
    model.remove_cascaded_cast_nodes()
    model.remove_useless_cast_nodes()
    drop_duplicate_casts(model.model.graph)
    model.save_model_to_file(str(dst), use_external_data_format=False)
    info = {"method": "float16", "logits": "fp32", "past": "fp16", "fp32_ops": blocked}
    return {**info, "state": "fp32", "fp32_state": states} if states else info
