"""The exported graph keeps the contract (docs/contract.md) and matches PyTorch at any batch and past."""
import json

import numpy as np
import onnx
import pytest
import torch

from pipeline import manifest
from pipeline.exports import past_names, present_names
from pipeline.run.lm import OnnxLM
from pipeline.run.sampling import SamplingConfig
from pipeline.train.runs import load_model


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_io_follows_the_contract(tiny_export, tiny_run):
    config = load_model(tiny_run).config
    graph = onnx.load(str(tiny_export / "onnx" / "model.onnx"), load_external_data=False).graph
    ins = {i.name: _dims(i) for i in graph.input}
    outs = {o.name: _dims(o) for o in graph.output}
    L, H, D = config.n_layer, config.n_head, config.head_dim
    assert list(ins) == ["input_ids", "attention_mask", "position_ids", *past_names(L)]
    assert list(outs) == ["logits", *present_names(L)]
    assert ins["input_ids"] == ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    for name in past_names(L):  # heads and head size are fixed integers: transformers.js sizes the cache from them
        assert ins[name] == ["batch_size", H, "past_sequence_length", D]
    for name in present_names(L):
        assert outs[name] == ["batch_size", H, "total_sequence_length", D]
    assert outs["logits"] == ["batch_size", "sequence_length", config.vocab_size]
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types["input_ids"] == types["attention_mask"] == types["position_ids"] == onnx.TensorProto.INT64


@pytest.mark.parametrize("B, T, P", [(1, 1, 0), (1, 7, 0), (3, 1, 5), (5, 4, 9), (2, 2, 2)])
def test_onnx_matches_pytorch_at_other_sizes(tiny_export, tiny_run, B, T, P):
    """The exporter saw batch 2, sequence 3, past 2: every other size must still be symbolic."""
    model, lm = load_model(tiny_run), OnnxLM(tiny_export)
    rng = np.random.default_rng(B * 100 + T * 10 + P)
    ids = rng.integers(0, model.config.vocab_size, (B, P + T))
    mask = np.ones((B, P + T), dtype=np.int64)
    pos = np.arange(P + T)[None].repeat(B, 0)
    with torch.no_grad():
        full, _ = model(torch.from_numpy(ids))
    _, past = lm.forward(ids[:, :P], mask[:, :P], pos[:, :P], lm.empty_past(B)) if P else (None, lm.empty_past(B))
    logits, present = lm.forward(ids[:, P:], mask, pos[:, P:], past)
    np.testing.assert_allclose(logits, full[:, P:].numpy(), atol=1e-4, rtol=0)
    assert present[0].shape == (B, model.config.n_head, P + T, model.config.head_dim)


def test_runtime_greedy_equals_pytorch_greedy(tiny_export, tiny_run):
    model, lm = load_model(tiny_run), OnnxLM(tiny_export)
    prompt = lm.encode("from email import message\n")
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            logits, _ = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    ours = [int(t[0]) for t in lm.generate([prompt], max_new_tokens=24, stop_at_eos=False)]
    assert ours == tokens[len(prompt):]


def test_batched_generation_rows_equal_rows_alone(tiny_export):
    lm = OnnxLM(tiny_export)
    prompts = [lm.encode(p) for p in ("import os", "def f(x):\n    return", "class A:")]
    together = np.stack(list(lm.generate(prompts, max_new_tokens=12, stop_at_eos=False)), 1)
    for b, p in enumerate(prompts):
        alone = np.stack(list(lm.generate([p], max_new_tokens=12, stop_at_eos=False)), 1)[0]
        assert together[b].tolist() == alone.tolist()


def test_sampling_is_seeded(tiny_export):
    lm = OnnxLM(tiny_export)
    prompt = [lm.encode("import")]
    run = lambda seed: [int(t[0]) for t in lm.generate(prompt, 20, SamplingConfig(1.0, 20, 0.9, seed), False)]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_folder_is_complete_and_the_manifest_is_true(tiny_export):
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "manifest.json", "parity.md", "parity.json", "onnx/model.onnx"):
        assert (tiny_export / name).is_file(), name
    m = json.loads((tiny_export / "manifest.json").read_text())
    assert m["source"]["model_sha256"] and m["parity"]["passed"] is True
    assert {"torch", "onnx", "onnxruntime"} <= set(m["tools"])
    manifest.verify(tiny_export)  # every listed file has its recorded sha256
    config = json.loads((tiny_export / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["eos_token_id"] == json.loads(
        (tiny_export / "generation_config.json").read_text())["eos_token_id"]


def test_parity_report_meets_the_fp32_threshold(tiny_export):
    report = json.loads((tiny_export / "parity.json").read_text())
    fp32 = report["variants"]["fp32"]
    assert fp32["status"] == "pass"
    assert fp32["max_abs"] <= 1e-4 and fp32["cache_max_abs"] <= 1e-4 and fp32["padded_max_abs"] <= 1e-4
    assert fp32["greedy_match"] == fp32["greedy_tokens"] == 64
