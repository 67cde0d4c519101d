"""onnxruntime-genai runs an export folder unchanged: its tokenizer gives our ids, its logits equal
ours step by step, and its greedy output equals `onnxgen run`'s, for an onnxgen-trained model and
for every Hugging Face family we import."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import HF_FAMILIES, onnxgen
from pipeline import manifest
from pipeline.run.lm import OnnxLM

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e '.[dev]')")

PROMPTS = ["def parse_header(line):\n    return", "import os\nfrom email import", "# héllo wörld ✓\n\tx = {'a': 1}"]
STEPS = 24


def genai_greedy(folder, ids: list[int], steps: int):
    """Greedy tokens and the logits each was chosen from, through onnxruntime-genai's own loop."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    tokens, logits = [], []
    while not gen.is_done():
        logits.append(np.asarray(gen.get_logits())[0, -1].copy())
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, np.stack(logits)


def onnxgen_greedy(lm: OnnxLM, ids: list[int], steps: int):
    """The same with our runtime's forward (no eos stop: genai runs to max_length here too)."""
    tokens, logits = [], []
    x, mask = np.array([ids]), np.ones((1, len(ids)), np.int64)
    pos, past = np.arange(len(ids))[None], lm.empty_past(1)
    for _ in range(steps):
        out, past = lm.forward(x, mask, pos, past)
        logits.append(out[0, -1])
        tokens.append(int(out[0, -1].argmax()))
        x, pos = np.array([[tokens[-1]]]), pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
    return tokens, np.stack(logits)


def test_genai_config_describes_the_graph(tiny_export):
    config = json.loads((tiny_export / "genai_config.json").read_text())
    model_config = json.loads((tiny_export / "config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama"
    assert decoder["filename"] == "onnx/model.onnx"
    assert decoder["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is False
    assert decoder["num_hidden_layers"] == model_config["n_layer"]
    assert decoder["num_attention_heads"] == decoder["num_key_value_heads"] == model_config["n_head"]
    assert decoder["head_size"] == model_config["n_embd"] // model_config["n_head"]
    assert config["model"]["context_length"] == model_config["n_positions"]
    assert "genai_config.json" in manifest.load(tiny_export)["files"]
    # genai decodes as `onnxgen run` and transformers do by default: generation_config.json's sampling
    gen = json.loads((tiny_export / "generation_config.json").read_text())
    assert gen["do_sample"] is True
    assert {k: config["search"][k] for k in ("do_sample", "temperature", "top_k", "top_p")} == \
        {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p")}


def test_genai_config_is_greedy_where_the_model_is(tmp_path, tiny_export):
    from pipeline.convert.genai import genai_config

    folder = tmp_path / "greedy"
    shutil.copytree(tiny_export, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False, "repetition_penalty": 1.2}))
    search = genai_config(folder)["search"]
    assert search["do_sample"] is False and search["top_k"] == 1 and search["repetition_penalty"] == 1.2


def test_genai_tokenizer_gives_our_ids(tiny_export):
    lm = OnnxLM(tiny_export)
    tok = og.Tokenizer(og.Model(str(tiny_export)))
    for text in PROMPTS:
        ids = [int(i) for i in tok.encode(text)]
        assert ids == lm.encode(text), text
        assert tok.decode(np.array(ids, dtype=np.int32)) == text


@pytest.mark.slow
def test_genai_greedy_equals_onnxgen_run(tiny_export):
    lm = OnnxLM(tiny_export)
    firsts = []
    for prompt in PROMPTS:
        ids = lm.encode(prompt)
        tokens, logits = genai_greedy(tiny_export, ids, STEPS)
        want_tokens, want_logits = onnxgen_greedy(lm, ids, STEPS)
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
        assert tokens == want_tokens
        firsts.append(logits[0])
    # the prompt reached the model: different prompts give different first-step logits (compared as logits,
    # not argmax tokens, which a small model may share across prompts)
    assert min(np.abs(a - b).max() for i, a in enumerate(firsts) for b in firsts[i + 1:]) > 1e-2
    # and as text, against the command line a user runs
    ids = lm.encode(PROMPTS[0])
    tokens, _ = genai_greedy(tiny_export, ids, STEPS)
    if lm.eos_id in tokens:  # onnxgen run stops there
        tokens = tokens[:tokens.index(lm.eos_id)]
    text = og.Tokenizer(og.Model(str(tiny_export))).decode(np.array(tokens, dtype=np.int32))
    proc = onnxgen("run", tiny_export, PROMPTS[0], "--max-new-tokens", STEPS, "--no-echo", "--temperature", "0")
    assert proc.stdout == text + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_genai_runs_imported_models(hf_exports, family):
    folder = hf_exports[family]
    lm = OnnxLM(folder)
    ids = lm.encode(PROMPTS[0])
    assert [int(i) for i in og.Tokenizer(og.Model(str(folder))).encode(PROMPTS[0])] == ids
    tokens, logits = genai_greedy(folder, ids, STEPS)
    want_tokens, want_logits = onnxgen_greedy(lm, ids, STEPS)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    assert tokens == want_tokens
    assert len(set(tokens)) > 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_genai_runs_the_int8_variant(int8_exports, tmp_path, name):
    """`onnxgen genai EXPORT --variant int8` repoints the config; genai then runs the int8 graph
    (logits equal to our int8 run, not to fp32's) and the manifest still verifies."""
    folder = tmp_path / name
    shutil.copytree(int8_exports[name], folder)
    proc = onnxgen("genai", folder, "--variant", "int8")
    assert "onnx/model_quantized.onnx" in proc.stdout
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"] == \
        "onnx/model_quantized.onnx"
    manifest.verify(folder)
    lm, fp32 = OnnxLM(folder, variant="int8"), OnnxLM(folder)
    ids = lm.encode(PROMPTS[0])
    tokens, logits = genai_greedy(folder, ids, STEPS)
    want_tokens, want_logits = onnxgen_greedy(lm, ids, STEPS)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    assert tokens == want_tokens
    assert np.abs(logits[0] - onnxgen_greedy(fp32, ids, 1)[1][0]).max() > 1e-4  # it really is the int8 graph
    proc = onnxgen("genai", folder, "--variant", "int4", check=False)
    assert proc.returncode == 2 and "model_q4.onnx does not exist" in proc.stderr


def genai_batch_greedy(folder, prompts: list[str], steps: int) -> list[list[int]]:
    """Greedy tokens of a batch of prompts through genai's own tokenizer (it pads the batch) and loop."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(og.Tokenizer(model).encode_batch(prompts))
    out = [[] for _ in prompts]
    for _ in range(steps):
        gen.generate_next_token()
        for row, token in zip(out, gen.get_next_tokens()):
            row.append(int(token))
    return out


@pytest.mark.slow
def test_genai_runs_the_fused_twin(tiny_fused_export, tmp_path):
    """`onnxgen genai EXPORT --fused` points genai at the fused twin (shared KV buffer); genai's padded batch
    then gives every row the greedy tokens it gets alone and that `onnxgen run`'s loop gives it."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_fused_export, folder)
    before = (folder / "genai_config.json").read_bytes()
    twin = folder / "onnx" / "model_gqa.onnx"
    twin.rename(folder / "aside.onnx")
    proc = onnxgen("genai", folder, "--fused", check=False)
    assert proc.returncode == 2 and "model_gqa.onnx does not exist" in proc.stderr and "onnxgen fuse" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and (folder / "genai_config.json").read_bytes() == before
    (folder / "aside.onnx").rename(twin)

    proc = onnxgen("genai", folder, "--fused")
    assert "onnx/model_gqa.onnx" in proc.stdout
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "onnx/model_gqa.onnx"
    assert config["search"]["past_present_share_buffer"] is True
    manifest.verify(folder)
    lm = OnnxLM(folder, fused=True)
    assert len({len(lm.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # the batch is padded
    alone = [genai_batch_greedy(folder, [p], 12)[0] for p in PROMPTS]
    assert genai_batch_greedy(folder, PROMPTS, 12) == alone
    for prompt, tokens in zip(PROMPTS, alone):
        ours = [int(t[0]) for t in lm.generate([lm.encode(prompt)], 12, stop_at_eos=False)]
        cut = tokens.index(lm.eos_id) + 1 if lm.eos_id in tokens else len(tokens)  # genai pads a row after its eos
        assert tokens[:cut] == ours[:cut]
    onnxgen("genai", folder, "--plain")
    assert (folder / "genai_config.json").read_bytes() == before


@pytest.mark.slow
def test_quantize_repoints_genai_from_the_twin_it_replaces(int8_exports, tmp_path):
    """Rebuilding a variant removes its stale twin; when genai_config.json named that twin, it is pointed at the
    new plain graph, so onnxruntime-genai never meets a missing file."""
    from pipeline.convert.fuse import fuse_export

    folder = tmp_path / "tiny"
    shutil.copytree(int8_exports["tiny"], folder)
    fuse_export(folder, ["int8"])
    onnxgen("genai", folder, "--variant", "int8", "--fused")
    proc = onnxgen("quantize", folder, "--variant", "int8")
    assert "genai_config.json named the fused twin of int8" in proc.stderr
    assert not (folder / "onnx" / "model_quantized_gqa.onnx").exists()
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "onnx/model_quantized.onnx"
    assert config["search"]["past_present_share_buffer"] is False
    manifest.verify(folder)
    assert len(genai_batch_greedy(folder, PROMPTS[:1], 2)[0]) == 2
