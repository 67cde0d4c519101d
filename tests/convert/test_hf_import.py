"""`onnxgen export --hf`: tiny random-weight transformers models of each supported family become
export folders that follow the graph contract, pass parity and run in onnxgen's own runtime."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import TEST_CORPUS, HF_FAMILIES, onnxgen
from pipeline import manifest
from pipeline.errors import UserError
from pipeline.convert.hf_import import SUPPORTED, export_hf
from pipeline.model.families import optimum_exports
from pipeline.exports import INPUTS, past_names, present_names
from pipeline.check.parity import THRESHOLDS
from pipeline.run.lm import OnnxLM

FAMILIES = list(HF_FAMILIES)
FOLDER_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "genai_config.json", "onnx/model.onnx", "manifest.json",
                "parity.json", "parity.md"]
PROMPT = "def parse_header(line):\n    return"


@pytest.mark.slow
def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    """A type that neither our families nor optimum (the fallback) export: one line naming ours."""
    src = tmp_path / "nonesuch"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "nonesuch", "n_layer": 2}))
    proc = onnxgen("export", "--hf", src, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    # the reason names optimum's verdict: it does not export the type, or (transformers 5) is not installed
    assert "'nonesuch' is not supported" in line and optimum_exports("nonesuch") in line
    assert optimum_exports("nonesuch").startswith(("optimum does not export it", "optimum, the fallback"))
    assert all(name in line for name in SUPPORTED), line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_other_types_fall_back_to_optimum(hf_models, tmp_path):
    """GPT-J is not one of our families: optimum exports it, and the reason is on stderr."""
    pytest.importorskip("optimum.exporters.onnx", reason="optimum (the hf extra) is not installed: it needs "
                        "transformers < 4.58, so a transformers 5 environment has no fallback exporter")
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tmp_path / "gptj"
    config = AutoConfig.for_model("gptj", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128,
                                  vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    shutil.copyfile(hf_models["llama"] / "tokenizer.json", src / "tokenizer.json")
    proc = onnxgen("export", "--hf", src, "--out", tmp_path / "out", "--corpus", TEST_CORPUS, check=False)
    assert "not one of onnxgen's families" in proc.stderr and "with optimum instead" in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert manifest.load(tmp_path / "out")["stages"][0]["exporter"] == "optimum"


def test_refuses_pickled_weights_and_missing_tokenizer(tmp_path, hf_models):
    src = tmp_path / "llama"
    shutil.copytree(hf_models["llama"], src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        export_hf(src, tmp_path / "out")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        export_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _dims(value):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_import_follows_the_contract(hf_exports, family):
    folder = hf_exports[family]
    for rel in FOLDER_FILES:
        assert (folder / rel).is_file(), rel
    manifest.verify(folder)  # every file hashed, nothing changed since
    m = manifest.load(folder)
    assert m["source"]["kind"] == "hf" and m["source"]["model_type"] == family
    assert json.loads((folder / "config.json").read_text())["model_type"] == family

    graph = onnx.load(str(folder / "onnx/model.onnx"), load_external_data=False).graph
    n_layer = len([i for i in graph.input if i.name.endswith(".key")])
    assert n_layer == 2
    assert [i.name for i in graph.input] == list(INPUTS) + past_names(n_layer)
    assert [o.name for o in graph.output] == ["logits"] + present_names(n_layer)
    ins = {i.name: _dims(i) for i in graph.input}
    outs = {o.name: _dims(o) for o in graph.output}
    assert ins["input_ids"] == ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    kv_heads = 4 if family in ("gpt2", "gpt_neox") else 2  # the configs' grouped-query attention
    assert ins["past_key_values.0.key"] == ["batch_size", kv_heads, "past_sequence_length", 8]
    assert outs["present.1.value"] == ["batch_size", kv_heads, "total_sequence_length", 8]
    assert outs["logits"] == ["batch_size", "sequence_length", 512]

    parity = json.loads((folder / "parity.json").read_text())
    fp32 = parity["variants"]["fp32"]
    assert parity["passed"] and fp32["status"] == "pass", fp32["failures"]
    assert fp32["tol_ratio"] <= 1.0 and fp32["max_abs"] <= THRESHOLDS["fp32"].atol
    assert fp32["greedy_match"] == fp32["greedy_tokens"] == 64
    assert parity["windows"] >= 32 and parity["window_length"] == 127 and fp32["scored"] >= 8192


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_import_generates_as_transformers_does(hf_models, hf_exports, family):
    """minGPT's pattern: logits close, then the same greedy tokens, against a freshly loaded
    transformers model using its own generate() (not our contract wrapper)."""
    from transformers import AutoModelForCausalLM

    lm = OnnxLM(hf_exports[family])
    hf = AutoModelForCausalLM.from_pretrained(hf_models[family], dtype=torch.float32).eval()
    ids = lm.encode(PROMPT)
    with torch.no_grad():
        want_logits = hf(torch.tensor([ids])).logits.numpy()
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    got_logits, _ = lm.forward(np.array([ids]), np.ones((1, len(ids)), np.int64),
                               np.arange(len(ids))[None], lm.empty_past(1))
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
    got = [int(t[0]) for t in lm.generate([ids], max_new_tokens=24)]
    assert got == want
    assert len(set(got)) > 3  # the random model does not just repeat one token: a real check


@pytest.mark.slow
def test_parity_stage_and_run_work_on_an_import(int8_exports, tmp_path):
    """`onnxgen parity` finds the transformers source in the manifest (and its corpus) and checks every
    variant present, int8 included; `onnxgen run` runs the folder. An import's int8 is reported and held to
    the import floor (check/parity.py IMPORT_FLOOR): it passes as it is, and fails once its weights are
    scrambled, which is the broken graph the floor is there to catch."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from pipeline.check.parity import IMPORT_FLOOR, IMPORT_FP16, thresholds_for

    folder = tmp_path / "llama"
    shutil.copytree(int8_exports["llama"], folder)
    assert thresholds_for(folder)["int8"] == IMPORT_FLOOR and thresholds_for(folder)["fp32"] == THRESHOLDS["fp32"]
    assert thresholds_for(folder)["fp16"] == IMPORT_FP16
    at_export = json.loads((folder / "parity.json").read_text())["variants"]["fp32"]
    proc = onnxgen("parity", folder, check=False)
    assert proc.returncode == 0, proc.stderr
    statuses = {v: r["status"] for v, r in json.loads((folder / "parity.json").read_text())["variants"].items()}
    assert statuses == {"fp32": "pass", "int8": "pass"} and "| int8 |" in proc.stdout
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["source"] == manifest.load(folder)["source"]["checkpoint"]
    fp32, int8 = parity["variants"]["fp32"], parity["variants"]["int8"]
    assert fp32["max_abs"] <= THRESHOLDS["fp32"].atol < int8["max_abs"]  # int8 really was compared
    # the same windows as at export (the corpus recorded in the manifest, not the default stdlib)
    assert fp32["ppl_reference"] == pytest.approx(at_export["ppl_reference"], rel=1e-9)
    assert manifest.load(folder)["stages"][-1]["stage"] == "parity"
    manifest.verify(folder)
    lm = OnnxLM(folder)
    want = lm.tokenizer.decode([int(t[0]) for t in lm.generate([lm.encode(PROMPT)], 12)])
    proc = onnxgen("run", folder, PROMPT, "--max-new-tokens", 12, "--no-echo", "--temperature", "0")
    assert proc.stdout == want + "\n"

    graph = onnx.load(str(folder / "onnx" / "model_quantized.onnx"))
    packed = {n.input[1] for n in graph.graph.node if n.op_type == "MatMulNBits"}
    for init in graph.graph.initializer:
        if init.name in packed:  # every output row gets another row's weights
            init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), 1, axis=0), init.name))
    onnx.save(graph, str(folder / "onnx" / "model_quantized.onnx"))
    proc = onnxgen("parity", folder, "--variant", "int8", check=False)
    assert proc.returncode == 1 and "int8: top-1 agreement" in proc.stderr, proc.stderr


def test_export_help_names_every_family():
    from pipeline.model.families import FAMILIES

    out = " ".join(onnxgen("export", "--help").stdout.split())
    assert all(f" {name}," in out or f" {name} " in out for name in FAMILIES), out


def test_export_needs_exactly_one_source(tmp_path):
    proc = onnxgen("export", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "CHECKPOINT run folder, --hf DIR or --gguf FILE" in proc.stderr
    proc = onnxgen("export", tmp_path, "--hf", tmp_path, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "one of them" in proc.stderr


def test_a_list_of_eos_ids_is_kept_for_the_other_runtimes(hf_models, tmp_path):
    """Llama 3 / Qwen2.5 style generation configs list several eos ids: the import keeps the list
    (onnxruntime-genai and transformers.js stop on any), a missing pad falls back to the first."""
    from pipeline.convert.hf_import import generation_config

    src = tmp_path / "src"
    shutil.copytree(hf_models["llama"], src)
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [7, 0]}))
    config = json.loads((src / "config.json").read_text())
    config.pop("pad_token_id", None)
    gen = generation_config(src, config)
    assert gen["eos_token_id"] == [7, 0] and gen["pad_token_id"] == 7
    assert generation_config(src, {**config, "pad_token_id": 0})["pad_token_id"] == 0
    (src / "generation_config.json").unlink()
    with pytest.raises(UserError, match="eos_token_id"):
        generation_config(src, {k: v for k, v in config.items() if k != "eos_token_id"})


@pytest.mark.slow
def test_genai_config_and_runtime_take_a_list_of_eos_ids(hf_exports, tmp_path):
    """genai_config.json keeps the list; OnnxLM loads the folder and stops on the first id."""
    from pipeline.convert.genai import genai_config

    folder = tmp_path / "llama"
    shutil.copytree(hf_exports["llama"], folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [7, 0]}))
    config = genai_config(folder)
    assert config["model"]["eos_token_id"] == [7, 0]
    assert OnnxLM(folder).eos_id == 7


@pytest.mark.slow
def test_trained_gpt2_imported_passes_every_variant(tiny_run, tmp_path):
    """Our trained tiny model written as a transformers GPT-2 folder, then imported with --hf: real
    weights, so every variant must meet its threshold against the transformers model."""
    onnxgen("to-hf", tiny_run, "--out", tmp_path / "hf")
    onnxgen("export", "--hf", tmp_path / "hf", "--out", tmp_path / "export", "--corpus", TEST_CORPUS)
    onnxgen("quantize", tmp_path / "export", "--variant", "all")
    proc = onnxgen("parity", tmp_path / "export")
    report = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert report["passed"] is True and report["source"] == str((tmp_path / "hf").resolve())
    assert {v: r["status"] for v, r in report["variants"].items()} == {
        "fp32": "pass", "fp16": "pass", "int8": "pass", "int4": "pass"}, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["file", "tokenizer_config"])
def test_export_ships_the_chat_template_both_ways(tmp_path, hf_models, where):
    """transformers 4.57 saves the template as chat_template.jinja only, older folders in
    tokenizer_config.json: the export carries it in both places, recorded in the manifest."""
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    src = tmp_path / "llama"
    shutil.copytree(hf_models["llama"], src)
    if where == "file":
        (src / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((src / "tokenizer_config.json").read_text())
        (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    out = tmp_path / "out"
    export_hf(src, out, corpus=str(TEST_CORPUS))
    assert (out / "chat_template.jinja").read_text() == template
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    manifest.verify(out, ["chat_template.jinja", "tokenizer_config.json"])
