"""Granite 4 (granitemoehybrid) through every stage: Mamba-2 layers beside an attention layer, each mamba layer's
conv state and SSM state fed back as past_conv.{i} / past_ssm.{i} (docs/contract.md part 3). One tiny import,
exported, quantized (int8, int4, fp16) and fused once; then the runtime's paths (plain, fused, a batch, continuous
batching, chat) each give the tokens of a row run alone."""
from __future__ import annotations

import json

import onnx
import pytest

from conftest import SHORT_CHATML, TEST_CORPUS
from pipeline import manifest
from test_families import CASES, FUSED_WIDER, copy_tokenizer, save_tiny
from test_state_cache import PROMPTS, _alone, dims, slots_start_from_fresh_state

pytestmark = pytest.mark.slow  # one export, two quantizations and a fuse for the module


@pytest.fixture(scope="module")
def granite4_export(hf_models, tmp_path_factory):
    """Layers mamba, attention, mamba; hidden 64 (head size 16: fusable), 4 mamba heads of 32, 2 groups of B and C
    (state 8), d_conv 4; 4 experts two a token beside the shared MLP; a context of 256 (a chat's turns); int8, int4
    and the fp32 and int8 fused twins; a chat template."""
    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.hf_import import export_hf
    from pipeline.convert.quantize import quantize
    from pipeline.exports import write_chat_template

    root = tmp_path_factory.mktemp("granite4")
    src = root / "src"
    model_type, sizes = CASES["granitemoehybrid"]
    save_tiny(src, model_type, {**sizes, "hidden_size": 64, **FUSED_WIDER["granitemoehybrid"],
                                "max_position_embeddings": 256}, vocab=512)
    copy_tokenizer(hf_models["llama"], src)
    out = root / "out"
    report = export_hf(src, out, corpus=str(TEST_CORPUS))
    quantize(out, "int8", progress=False)
    quantize(out, "int4", progress=False)
    quantize(out, "fp16", progress=False)
    fuse_export(out, ["fp32", "int8"])
    manifest.record(out, "chat-template", write_chat_template(out, SHORT_CHATML))
    return out, report


def test_export_follows_the_state_contract(granite4_export):
    """Names and shapes as transformers.js reads them (getCacheNames: past_conv.{i} then past_ssm.{i} for a mamba
    layer, K/V for an attention layer): conv (batch, conv_dim = inner + 2 groups state, d_conv - 1), SSM (batch,
    heads, head, d_state), fixed but batch, in and out. Parity against transformers passes with the state carried
    (64 greedy tokens, the padded batch as each row alone); int8 and int4 keep both states fp32 and quantize the
    mamba projections; fp16 keeps the SSM state (and GatedDeltaNet) fp32, the rest fp16; the fused twins have GroupQueryAttention on the attention layer and the mamba layers'
    CausalConvWithState and GatedDeltaNet, and pass."""
    out, report = granite4_export
    fp32 = report.to_dict()["variants"]["fp32"]
    assert report.passed and fp32["greedy_match"] == 64 and fp32["padded_max_abs"] < 1e-4, fp32
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    ins, outs = {i.name: dims(i) for i in graph.input}, {o.name: dims(o) for o in graph.output}
    assert list(ins)[3:] == ["past_conv.0", "past_ssm.0", "past_key_values.1.key", "past_key_values.1.value",
                             "past_conv.2", "past_ssm.2"]
    conv_dim = 4 * 32 + 2 * 2 * 8
    assert ins["past_conv.0"] == outs["present_conv.0"] == ins["past_conv.2"] == ["batch_size", conv_dim, 3]
    assert ins["past_ssm.0"] == outs["present_ssm.2"] == ["batch_size", 4, 32, 8]
    assert ins["past_key_values.1.key"] == ["batch_size", 2, "past_sequence_length", 16]

    for variant in ("model_quantized.onnx", "model_q4.onnx"):
        g = onnx.load(str(out / "onnx" / variant), load_external_data=False).graph
        states = [v for v in list(g.input) + list(g.output) if "conv" in v.name or "ssm" in v.name]
        assert len(states) == 8 and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in states)
        nbits = [n.name for n in g.node if n.op_type == "MatMulNBits"]
        assert any("/h.0/mamba/in_proj" in n for n in nbits) and any("/h.2/mamba/out_proj" in n for n in nbits), nbits
        ops = [n.op_type for n in g.node]
        assert ops.count("GatedDeltaNet") == 2 and ops.count("CausalConvWithState") == 2, variant

    fp16 = onnx.load(str(out / "onnx" / "model_fp16.onnx"), load_external_data=False).graph  # the SSM state fp32
    types = {v.name: v.type.tensor_type.elem_type for v in list(fp16.input) + list(fp16.output)}
    assert types["past_ssm.0"] == types["present_ssm.2"] == onnx.TensorProto.FLOAT
    assert types["past_conv.0"] == types["past_key_values.1.key"] == onnx.TensorProto.FLOAT16

    for twin in ("model_gqa.onnx", "model_quantized_gqa.onnx"):
        g = onnx.load(str(out / "onnx" / twin), load_external_data=False).graph
        ops = [n.op_type for n in g.node]
        assert ops.count("GroupQueryAttention") == 1, twin
        assert ops.count("CausalConvWithState") == 2 and ops.count("GatedDeltaNet") == 2, twin
        assert {i.name: dims(i) for i in g.input}["past_ssm.2"] == ["batch_size", 4, 32, 8]
    fused = manifest.load(out)["stages"][-2]["fused"]["variants"]
    assert {v: r["status"] for v, r in fused.items()} == {"fp32 fused": "pass", "int8 fused": "pass"}


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4", "fp16"])
def test_a_batch_gives_each_rows_tokens_alone(granite4_export, variant):
    """The plain graph left-pads a batch (padding zeroed before in_proj and after the convolution, as transformers
    does); the fused twin prefills a batch with state row by row, then steps it as one: each row's greedy tokens
    are its tokens alone, in both."""
    from pipeline.run.lm import OnnxLM

    out, _ = granite4_export
    for fused in (False, True) if variant in ("fp32", "int8") else (False,):
        lm = OnnxLM(out, variant, fused=fused)
        assert lm.has_state and lm.fused == fused
        batch = [list(map(int, r)) for r in zip(*lm.generate(PROMPTS, 10, stop_at_eos=False))]
        assert batch == [_alone(lm, p) for p in PROMPTS], (variant, fused)


def test_continuous_batching_reuses_slots_with_fresh_state(granite4_export):
    """Five requests through two slots: each newcomer's conv and SSM state start from zeros, prefix caching stays
    off; every answer is the request's tokens alone."""
    slots_start_from_fresh_state(granite4_export[0])


def test_chat_answers_as_a_fresh_prefill(granite4_export):
    """A chat over the state model: reusing the state when a turn extends the cache gives a fresh prefill's answers."""
    from pipeline.run.chat import ChatSession
    from pipeline.run.lm import OnnxLM
    from pipeline.run.sampling import SamplingConfig

    out, _ = granite4_export
    lm = OnnxLM(out, fused=True)
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=3)
    kept = ChatSession(lm, system="Be brief.", sampling=sampling, max_new_tokens=6)
    fresh = ChatSession(lm, system="Be brief.", sampling=sampling, max_new_tokens=6, reuse=False)
    for question in ["import os", "def f(x):", "return"]:
        before = len(kept.cached)
        assert "".join(kept.reply(question)) == "".join(fresh.reply(question)), question
        assert kept.turns[-1].reused in (0, before), (before, kept.turns[-1])
    assert kept.messages == fresh.messages


def test_onnxruntime_genai_config_is_not_written_for_mamba_state(granite4_export):
    """onnxruntime-genai 0.18 carries LFM2's conv state but no SSM state: the export writes no genai_config.json
    for a graph with past_ssm.* (rather than one genai would misread), and `onnxgen genai` says why in one line."""
    from pipeline.convert.genai import use_variant
    from pipeline.errors import UserError

    out, _ = granite4_export
    assert not (out / "genai_config.json").exists()
    with pytest.raises(UserError, match=r"onnxruntime-genai .*no Mamba-2 state \(past_ssm") as e:
        use_variant(out, "fp32")
    assert "\n" not in str(e.value)
    assert json.loads((out / "config.json").read_text())["model_type"] == "granitemoehybrid"
