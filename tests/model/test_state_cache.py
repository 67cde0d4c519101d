"""A hybrid family's state cache through every stage: LFM2 (short-convolution layers beside attention layers),
its conv state fed back as past_conv.{i} / present_conv.{i} (docs/contract.md part 3). One tiny import,
exported, quantized and fused once; then the runtime's paths (plain, fused, a batch, continuous batching,
chat) and onnxruntime-genai each give the tokens of a row run alone."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import SHORT_CHATML, TEST_CORPUS
from pipeline import manifest
from test_families import CASES, copy_tokenizer, save_tiny

pytestmark = pytest.mark.slow  # one export, quantize and fuse for the module (~40 s)

PROMPTS = [[5, 17, 33, 2, 9], [40, 41], [7, 7, 7, 100, 3, 250]]


def dims(value) -> list:
    return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def lfm2_export(hf_models, tmp_path_factory):
    """Layers conv, attention, conv, attention; hidden 64 (head size 16: fusable), a context of 256 (a chat's
    turns); int8 and both fused twins; a chat template."""
    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.hf_import import export_hf
    from pipeline.convert.quantize import quantize
    from pipeline.exports import write_chat_template

    root = tmp_path_factory.mktemp("lfm2")
    src = root / "src"
    model_type, sizes = CASES["lfm2"]
    save_tiny(src, model_type, {**sizes, "hidden_size": 64, "max_position_embeddings": 256}, vocab=512)
    copy_tokenizer(hf_models["llama"], src)
    out = root / "out"
    report = export_hf(src, out, corpus=str(TEST_CORPUS))
    quantize(out, "int8", progress=False)
    fuse_export(out, ["fp32", "int8"])
    manifest.record(out, "chat-template", write_chat_template(out, SHORT_CHATML))
    return out, report


def test_export_follows_the_state_contract(lfm2_export):
    """Names and shapes as transformers.js and onnxruntime-genai read them: a conv layer's state is (batch,
    hidden, L_cache - 1), fixed but batch, in and out; attention layers keep K/V. Parity against transformers
    passes with the state carried (64 greedy tokens); int8 keeps the state fp32 and quantizes the conv
    projections; the fused twins have GroupQueryAttention on the two attention layers and ONNX Runtime's
    CausalConvWithState on the two conv layers, and pass."""
    out, report = lfm2_export
    fp32 = report.to_dict()["variants"]["fp32"]
    assert report.passed and fp32["greedy_match"] == 64 and fp32["padded_max_abs"] < 1e-4, fp32
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    ins, outs = {i.name: dims(i) for i in graph.input}, {o.name: dims(o) for o in graph.output}
    assert list(ins)[3:] == ["past_conv.0", "past_key_values.1.key", "past_key_values.1.value", "past_conv.2",
                             "past_key_values.3.key", "past_key_values.3.value"]
    assert ins["past_conv.0"] == outs["present_conv.0"] == ins["past_conv.2"] == ["batch_size", 64, 2]
    assert ins["past_key_values.1.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert outs["present.3.value"] == ["batch_size", 2, "total_sequence_length", 16]

    int8 = onnx.load(str(out / "onnx" / "model_quantized.onnx"), load_external_data=False).graph
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in int8.input if "conv" in i.name)
    nbits = [n.name for n in int8.node if n.op_type == "MatMulNBits"]
    assert any("/h.0/conv/c_in" in n for n in nbits) and any("/h.2/conv/c_proj" in n for n in nbits), nbits

    for twin in ("model_gqa.onnx", "model_quantized_gqa.onnx"):
        g = onnx.load(str(out / "onnx" / twin), load_external_data=False).graph
        ops = [n.op_type for n in g.node]
        assert ops.count("GroupQueryAttention") == 2 and ops.count("CausalConvWithState") == 2, twin
        assert "Conv" not in ops, twin  # the state is read and written in place, not concatenated
        assert {i.name: dims(i) for i in g.input}["past_conv.2"] == ["batch_size", 64, 2]
    fused = manifest.load(out)["stages"][-2]["fused"]["variants"]
    assert {v: r["status"] for v, r in fused.items()} == {"fp32 fused": "pass", "int8 fused": "pass"}


def _alone(lm, prompt, n=10):
    return [int(t[0]) for t in lm.generate([prompt], n, stop_at_eos=False)]


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_a_batch_gives_each_rows_tokens_alone(lfm2_export, variant):
    """The plain graph left-pads a batch (padding zeroed before the convolution, as transformers does); the
    fused twin prefills a batch with state row by row, then steps it as one: each row's greedy tokens are
    its tokens alone, in both."""
    from pipeline.run.lm import OnnxLM

    out, _ = lfm2_export
    for fused in (False, True):
        lm = OnnxLM(out, variant, fused=fused)
        assert lm.has_state and lm.fused == fused
        batch = [list(map(int, r)) for r in zip(*lm.generate(PROMPTS, 10, stop_at_eos=False))]
        assert batch == [_alone(lm, p) for p in PROMPTS], (variant, fused)


def slots_start_from_fresh_state(out):
    """Five requests through two slots of the fused twin of `out`: every answer is the request's tokens alone
    (a newcomer's state starts from zeros, not from its slot's last request), and prefix caching, asked for,
    stays off."""
    import threading

    from pipeline.run.batching import BatchEngine, Request
    from pipeline.run.lm import OnnxLM
    from pipeline.run.sampling import SamplingConfig

    lm = OnnxLM(out, fused=True)
    engine = BatchEngine(lm, capacity=2, prefix_cache_bytes=1e8, prefix_block=4).start()
    try:
        assert engine.prefix is None
        done = threading.Semaphore(0)
        prompts = PROMPTS + [[300, 301, 302], [9, 8, 7, 6, 5, 4, 3]]
        requests = [Request(prompt=p, max_tokens=8 + i, sampling=SamplingConfig(temperature=0.0),
                            emit=lambda kind, data: kind != "text" and done.release()) for i, p in enumerate(prompts)]
        for r in requests:
            assert engine.submit(r)
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    for i, (p, r) in enumerate(zip(prompts, requests)):
        assert r.finish_reason in ("stop", "length")
        result = _alone(lm, p, 8 + i)
        assert r.tokens == result[:len(r.tokens)] and (r.finish_reason == "stop" or len(r.tokens) == 8 + i)


def test_continuous_batching_reuses_slots_with_fresh_state(lfm2_export):
    """Five requests through two slots: each newcomer's conv state starts from zeros, not from the slot's last
    request, and prefix caching (asked for) stays off; every answer is the request's tokens alone."""
    slots_start_from_fresh_state(lfm2_export[0])


def test_chat_reuses_the_state_only_when_a_turn_extends_it(lfm2_export):
    """A conv state cannot be rewound: a turn whose tokens extend all the cached ones appends to them; any other
    (a re-tokenized answer, a template that rewrites the last turn) prefills afresh. Either way the logits and
    answers are a fresh prefill's."""
    from pipeline.run.chat import ChatSession, Turn
    from pipeline.run.lm import OnnxLM
    from pipeline.run.sampling import SamplingConfig

    out, _ = lfm2_export
    lm = OnnxLM(out, fused=True)
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=3)
    kept = ChatSession(lm, system="Be brief.", sampling=sampling, max_new_tokens=6)
    fresh = ChatSession(lm, system="Be brief.", sampling=sampling, max_new_tokens=6, reuse=False)
    for question in ["import os", "def f(x):", "return", "class A:"]:
        before = len(kept.cached)
        assert "".join(kept.reply(question)) == "".join(fresh.reply(question)), question
        assert kept.turns[-1].reused in (0, before), (before, kept.turns[-1])  # all of the cache, or none
    assert kept.messages == fresh.messages

    cached = list(kept.cached)
    more = lm.encode("x = 1")
    turn = Turn()
    state = kept._prefill(cached + more, turn)  # extends the cache: appended
    assert (turn.reused, turn.prefilled) == (len(cached), len(more)) and state is kept.state
    np.testing.assert_allclose(state.logits, lm.start([cached + more], 1).logits, atol=1e-4)
    rewritten = cached[:-2] + more  # the cache holds two tokens the history lacks: a fresh prefill
    turn = Turn()
    state = kept._prefill(rewritten, turn)
    assert (turn.reused, turn.prefilled) == (0, len(rewritten))
    np.testing.assert_allclose(state.logits, lm.start([rewritten], 1).logits, atol=1e-4)


def test_onnxruntime_genai_runs_the_export(lfm2_export):
    """genai's lfm2 type runs the plain graph from the genai_config.json export writes (conv state named
    past_conv.%d, its width L_cache - 1), and the fused twin `onnxgen genai --fused` points it at (K/V and
    state in shared buffers): its greedy tokens are ours."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from pipeline.convert.genai import use_variant
    from pipeline.run.lm import OnnxLM

    out, _ = lfm2_export
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "lfm2" and decoder["conv_cache_size"] == 2
    assert decoder["layer_types"] == ["conv", "full_attention", "conv", "full_attention"]
    assert decoder["inputs"]["past_conv_names"] == "past_conv.%d"
    lm = OnnxLM(out)
    try:
        for fused in (False, True):
            use_variant(out, "fp32", fused=fused)
            model = og.Model(str(out))
            for prompt in PROMPTS:
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
                gen = og.Generator(model, params)
                gen.append_tokens(np.array([prompt], dtype=np.int32))
                while not gen.is_done():
                    gen.generate_next_token()
                assert [int(t) for t in gen.get_sequence(0)[len(prompt):]] == _alone(lm, prompt, 12), fused
    finally:
        use_variant(out, "fp32")
