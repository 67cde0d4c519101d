"""Routed experts through the stages: the QMoE codes quantize writes are what ONNX Runtime computes with,
and a mixture-of-experts import (gpt-oss: sinks, biases, a clamped SwiGLU) goes through export, quantize,
fuse and run with its experts in one MoE/QMoE node a layer."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TEST_CORPUS
from pipeline import manifest
from pipeline.convert.quantize.experts import dequantize_codes, quantize_codes, quantize_experts


def _moe_graph(E=4, C=32, inner=32, k=2, seed=0):
    rng = np.random.default_rng(seed)
    w = {"fc1": rng.standard_normal((E, 2 * inner, C)).astype(np.float32) * 0.3,
         "fc1_bias": rng.standard_normal((E, 2 * inner)).astype(np.float32) * 0.1,
         "fc2": rng.standard_normal((E, C, inner)).astype(np.float32) * 0.3,
         "fc2_bias": rng.standard_normal((E, C)).astype(np.float32) * 0.1}
    node = helper.make_node("MoE", ["x", "router", "fc1", "fc1_bias", "fc2", "fc2_bias"], ["y"], name="/h.0/mlp/MoE",
                            domain="com.microsoft", k=k, activation_type="swiglu", swiglu_fusion=1,
                            normalize_routing_weights=1, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=7.0)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", C]),
                                              helper.make_tensor_value_info("router", TensorProto.FLOAT, ["n", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", C])],
                              [numpy_helper.from_array(v, n) for n, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feed = {"x": rng.standard_normal((7, C)).astype(np.float32), "router": rng.standard_normal((7, E)).astype(np.float32)}
    return model, w, feed


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("bits,block", [(4, 16), (4, 0), (8, 0)])
def test_qmoe_computes_with_the_codes_quantize_writes(bits, block):
    """The QMoE node quantize_experts writes gives what the MoE node gives with the weights its codes
    dequantize to (so the packing, the zero point and the scales' layout are ONNX Runtime's), and those
    weights are within half a step of the originals."""
    model, w, feed = _moe_graph()
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    details = quantize_experts(quantized, bits, block)
    assert details["experts"] == {"op": "QMoE", "bits": bits, "layers": 1, "block_size": block, "router": "fp32"}
    assert [n.op_type for n in quantized.graph.node] == ["QMoE"]
    names = {t.name for t in quantized.graph.initializer}
    assert "fc1" not in names and "fc2" not in names  # the fp32 experts are gone
    for name in ("fc1", "fc2"):
        codes, scales = quantize_codes(w[name], bits, block or w[name].shape[2])
        back = dequantize_codes(codes, scales, bits)
        step = np.repeat(scales, back.shape[2] // scales.shape[2], axis=2)
        assert np.all(np.abs(back - w[name]) <= step / 2 + 1e-6)
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == name))
        model.graph.initializer.append(numpy_helper.from_array(back, name))
    want = _run(model, feed)
    np.testing.assert_allclose(_run(quantized, feed), want, atol=2e-5 * np.abs(want).max())


@pytest.mark.slow
def test_a_mixture_of_experts_import_goes_through_every_stage(hf_models, tmp_path):
    """gpt-oss from a transformers folder: export (one MoE node a layer, parity against transformers),
    quantize int8 and int4 (QMoE, the routers left fp32 MatMuls), fuse (GroupQueryAttention with the sinks,
    judged against transformers), and onnxgen's runtime gives the same greedy tokens on each twin as on
    its plain graph."""
    from model.test_families import TWIN_PROMPTS, copy_tokenizer, fused_case, twins_generate_as_plain_graphs

    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.hf_import import export_hf
    from pipeline.convert.quantize import quantize
    from pipeline.run.lm import OnnxLM

    src = fused_case(tmp_path, "gpt_oss", vocab=512)
    copy_tokenizer(hf_models["llama"], src)
    out = tmp_path / "out"
    assert export_hf(src, out, corpus=str(TEST_CORPUS)).passed
    n_layer = 2
    ops = [n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node]
    assert ops.count("MoE") == n_layer
    for variant, bits, block in (("int8", 8, 0), ("int4", 4, 32)):
        assert quantize(out, variant, progress=False)[variant]["experts"]["bits"] == bits
        graph = onnx.load(str(out / "onnx" / ("model_quantized.onnx" if variant == "int8" else "model_q4.onnx"))).graph
        qmoe = [n for n in graph.node if n.op_type == "QMoE"]
        assert len(qmoe) == n_layer and "MoE" not in [n.op_type for n in graph.node]
        attrs = {a.name: helper.get_attribute_value(a) for a in qmoe[0].attribute}
        assert attrs["expert_weight_bits"] == bits and attrs.get("block_size", 0) == block
        assert attrs["swiglu_limit"] == pytest.approx(0.5) and attrs["activation_alpha"] == pytest.approx(1.702)
        routers = [n for n in graph.node if "/mlp/router/" in n.name and n.op_type == "MatMul"]
        assert len(routers) == n_layer
    assert fuse_export(out, ["fp32", "int8"]) == ["onnx/model_gqa.onnx", "onnx/model_quantized_gqa.onnx"]
    fused = manifest.load(out)["stages"][-1]["fused"]["variants"]
    assert {v: r["status"] for v, r in fused.items()} == {"fp32 fused": "pass", "int8 fused": "pass"}
    twins_generate_as_plain_graphs(out, ("fp32", "int8"))
    prompts = TWIN_PROMPTS
    steps = [list(map(int, t)) for t in OnnxLM(out, "int4").generate(prompts, 4, stop_at_eos=False)]
    assert len(steps) == 4 and all(len(s) == len(prompts) for s in steps)
