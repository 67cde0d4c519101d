"""Optimize: onnx/model.onnx (plain fp32) -> a fused fp32 graph that the quantizers start from.

Two passes, both measured on our graph (tiny and small presets, onnxruntime 1.31):
    constant head   the tied LM head's weight must be a constant initializer, or the quantizers skip it
                    ("MatMul doesn't have const weight" is only logged) and int8/int4 leave the largest
                    matrix in fp32. The TorchScript exporter already folds `wte.T` into an initializer;
                    the dynamo exporter keeps a runtime Transpose of the embedding, which we fold here.
    fusions         onnxruntime.transformers' gpt2 optimizer: every residual Add + LayerNormalization
                    becomes SkipLayerNormalization (2 per layer + the final one) and each MLP's
                    bias + tanh-GELU becomes FastGelu (1 per layer). Attention is NOT fused: the fuser
                    looks for Hugging Face GPT-2's subgraph, and ours (SDPA with an additive mask built
                    from attention_mask) does not match it. A fused attention graph is issue 4's work
                    (runtime speed); here we only record what fused so a regression shows in the manifest.

ONNX Runtime's own session optimizer (ORT_ENABLE_EXTENDED/ALL) does NOT make these fusions on this graph
(checked by saving its optimized model: LayerNormalization, Tanh and Mul stay), so they only exist if
done here. Why model.onnx itself stays the plain graph anyway: see `quantize.py`'s docstring (measured).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.exports import detach_weights, load_graph, read_config, release_memory
from pipeline.model.families import arch_of

log = logging.getLogger(__name__)

# the fusions we expect, by the decoder's norm; anything else fused is reported too
EXPECTED_FUSIONS = {"layernorm": ("SkipLayerNormalization",), "rmsnorm": ("SkipSimplifiedLayerNormalization",)}


def constant_head(model: onnx.ModelProto) -> int:
    """Fold Transpose(initializer) feeding a MatMul into a transposed initializer; returns how many.

    Written by hand because no library pass does exactly this while keeping the embedding's Gather
    intact: onnxruntime's constant folding would do it only inside a session (and the optimized model
    it saves is tied to the machine's instruction set), onnx-simplifier is not a dependency here.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    folded = 0
    for node in list(g.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != node.output[0] for u in users):
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        folded_w = np.ascontiguousarray(np.transpose(w, perm))  # (C, V) for the head
        name = f"{node.input[0]}.T"
        g.initializer.append(numpy_helper.from_array(folded_w, name))
        for u in users:
            u.input[1] = name
        g.node.remove(node)
        folded += 1
    return folded


def matmuls_without_constant_weight(model: onnx.ModelProto) -> list[str]:
    """MatMuls whose weight is a runtime Transpose/Cast/Identity of an initializer: weights the
    quantizers cannot see. (Attention's Q·Kᵀ and P·V multiply two activations and are not listed.)"""
    inits = {i.name for i in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}
    bad = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] in inits:
            continue
        src = produced.get(n.input[1])
        if src is not None and src.op_type in ("Transpose", "Cast", "Identity") and src.input[0] in inits:
            bad.append(n.name)
    return bad


def optimize(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int, fuse: bool = True,
             norm: str = "layernorm") -> dict:
    """The optimize stage: src (plain fp32 graph) -> dst (fused fp32 graph), its weights in dst + ".data"
    beside it (ONNX external data: the file is a stage's intermediate, read whole by onnx.load and ONNX
    Runtime). Returns what it did: {"fused": {op: count}, "constant_head_folded": n}. dst is written whole
    (callers rename it).

    The fusions and the shape inference run on the graph without its weights: both copy the model they are
    given (onnxruntime.transformers' fusions, ORT's symbolic shape inference twice), which with the weights
    was 4.3 GB at the peak for SmolLM2's 0.54 GB (benchmarks/MEMORY_NOTES.md). The weights go to dst's data
    file first, and only what the passes add (a fused node's new constants) stays in the graph."""
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    dst = Path(dst)
    data = dst.with_name(dst.name + ".data")
    data.unlink(missing_ok=True)
    model = load_graph(src)
    folded = constant_head(model)
    model = detach_weights(model, dst.parent, data.name)
    release_memory()
    if fuse:
        # opt_level=0: only the Python fusions. Levels 1+ run an ORT session and save its optimized graph,
        # which bakes in this machine's kernels (and is what a session does at load anyway).
        opt = optimize_model(model, model_type="gpt2", num_heads=num_heads, hidden_size=hidden_size,
                             opt_level=0, use_gpu=False)
        stats = {op: n for op, n in opt.get_fused_operator_statistics().items() if n}
        missing = [op for op in EXPECTED_FUSIONS[norm] if not stats.get(op)]
        if missing:
            log.warning("optimize: expected fusions did not happen: %s", ", ".join(missing))
    else:
        # Optimum's graphs (architectures outside onnxgen's families): quantized as they are
        opt, stats = OnnxModel(model), {}
    assert not matmuls_without_constant_weight(opt.model), "a weight MatMul still has a runtime weight"
    _same_io(model, opt.model)
    _record_types(opt.model)
    opt.save_model_to_file(str(dst), use_external_data_format=False)
    log.info("optimize: fused %s; folded %d runtime head transpose(s)",
             ", ".join(f"{n} {op}" for op, n in stats.items()) or "nothing", folded)
    return {"fused": stats, "constant_head_folded": folded}


def optimize_export(folder: str | Path, src: str | Path, dst: str | Path) -> dict:
    """optimize() with what the export says: its heads, width and norm (config.json); a graph of Optimum's
    (the fallback exporter, manifest.json) is left unfused. The quantized variants start from its output, and
    `onnxgen fuse` builds the fp32 twin from it (the plain model.onnx stays free of contrib ops)."""
    shape = read_config(folder)
    exporter = (manifest.load(folder).get("stages") or [{}])[0].get("exporter")
    arch = arch_of(folder)
    norm = arch.norm if arch is not None else "layernorm"
    return optimize(src, dst, shape.heads, shape.hidden, fuse=exporter != "optimum", norm=norm)


def _record_types(model: onnx.ModelProto) -> None:
    """Give every intermediate tensor its element type (value_info) and no shape.

    The quantizers need each tensor's type, and onnx's shape inference does not know the fused
    com.microsoft ops; ORT's symbolic shape inference does. Its shapes are dropped: with auto_merge it
    merges the mask's broadcast head dim (B, 1, T, P+T) with the scores' (B, H, T, P+T), and a session
    that trusts that value_info fails at run time ("Shape mismatch attempting to re-use buffer")."""
    typed = _symbolic_shapes(model)
    del model.graph.value_info[:]
    for vi in typed.graph.value_info:
        vi.type.tensor_type.ClearField("shape")
        model.graph.value_info.append(vi)


# the state ops (Qwen3.5, Granite 4, LFM2's fused twin), which ORT's symbolic shape inference does not know:
# output -> the input whose type and shape it has (LinearAttention: output like value, present_state like
# past_state; GatedDeltaNet: output like value, final_state like initial_state; CausalConvWithState: output
# like input, present_state like past_state)
STATE_OP_SHAPES = {"LinearAttention": ((0, 2), (1, 3)), "GatedDeltaNet": ((0, 2), (1, 6)),
                   "CausalConvWithState": ((0, 0), (1, 3))}


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """SymbolicShapeInference.infer_shapes(model, auto_merge=True), taught the state ops above."""
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_elem_type_from_type_proto

    infer = SymbolicShapeInference(2**31 - 1, True, False, 0)

    def passes(pairs, node):
        for out, src in pairs:
            if out < len(node.output) and node.output[out]:
                infer.known_vi_[node.output[out]].CopyFrom(helper.make_tensor_value_info(
                    node.output[out], get_elem_type_from_type_proto(infer.known_vi_[node.input[src]].type),
                    infer._get_shape(node, src)))

    for op, pairs in STATE_OP_SHAPES.items():
        infer.dispatcher_.setdefault(op, lambda node, pairs=pairs: passes(pairs, node))
    infer._preprocess(model)  # what infer_shapes does, with the dispatcher above
    done = False
    while infer.run_:
        done = infer._infer_impl()
    infer._update_output_from_vi()
    if not done:
        raise UserError("graph: ONNX Runtime's symbolic shape inference could not type every tensor")
    return infer.out_mp_


def _same_io(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    """The optimizer must not touch the graph contract (names, order, types, symbolic dims)."""
    def io(m):
        return [(v.name, v.type.SerializeToString()) for v in (*m.graph.input, *m.graph.output)]
    assert io(a) == io(b), "optimize changed the graph's inputs or outputs"
