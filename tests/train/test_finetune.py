"""Fine-tuning `tiny` (trained on Python source) on text of another style, with LoRA and in full:
the validation loss on the new text falls, the run exports, and the ONNX graph passes fp32 parity
against the fine-tuned PyTorch model (for LoRA: the peft model with its adapter unmerged)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from conftest import onnxgen
from pipeline import manifest
from pipeline.errors import UserError
from pipeline.train.finetune import LoraSettings, finetune
from pipeline.train.runs import load_model

pytestmark = pytest.mark.slow

# A few seconds of training each; the rates are high because the runs are short.
LORA = dict(steps=30, lr=1e-2, eval_interval=10, checkpoint_interval=10, eval_batches=4)


@pytest.fixture(scope="module")
def lora_run(tiny_run, finetune_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "tiny-lora"
    state = finetune(tiny_run, finetune_data / "qa.jsonl", out, method="lora", progress=False, overrides=LORA)
    return out, state


def test_lora_learns_the_completions(lora_run, tiny_run):
    run, state = lora_run
    # The base has never seen English question/answer pairs; 30 steps of rank-8 adapters must move it.
    assert state["val_loss"] < state["val_loss_before"] - 0.3, state
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 10, 20, 30]
    assert history[0]["val_loss"] == state["val_loss_before"]
    # rank 8 on c_attn (C -> 3C), attn.c_proj (C -> C), c_fc (C -> 4C), mlp.c_proj (4C -> C): r * 16C per layer
    c = load_model(tiny_run).config
    assert state["trainable_parameters"] == c.n_layer * 8 * 16 * c.n_embd
    assert state["total_parameters"] == load_model(tiny_run).num_parameters()
    # the checkpoint is the adapter (peft's format), not a copy of the base
    ckpt = run / "checkpoint"
    assert not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert len(adapter) == 2 * 4 * c.n_layer and all(".lora_" in k for k in adapter)
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8


def test_jsonl_loss_counts_the_completion_only(lora_run, tiny_run):
    from pipeline.train.finetune import Split
    from pipeline.tokenizer import load_tokenizer

    run, _ = lora_run
    tok = load_tokenizer(tiny_run)
    split = Split.load(run / "data", "train", np.uint16)
    first = slice(int(split.starts[0]), int(split.starts[1]))
    counted = split.ids[first][split.counts[first] == 1]
    assert tok.decode(counted.tolist()).startswith(" The ") and tok.decode(counted.tolist()).endswith(".")
    assert "Question" in tok.decode(split.ids[first][split.counts[first] == 0].tolist())
    x, y = split.batch(64, 8, np.random.default_rng(0), pad_id=0)
    # every counted target is a completion token: the prompt's targets and the padding are -100
    assert ((y != -100).sum(1) < (x != 0).sum(1)).all()


def test_lora_export_merges_adapter_and_passes_parity(lora_run, tiny_run, tiny_export, tmp_path):
    from pipeline.convert.export import export

    run, _ = lora_run
    report = export(run, tmp_path / "exp")
    fp32 = report.results[0]
    assert report.passed and fp32.max_abs <= 1e-4 and fp32.greedy_match == fp32.greedy_tokens
    # the adapter changed the model: parity's reference is not simply the base
    ids = torch.from_numpy(np.fromfile(run / "data" / "valid.bin", dtype=np.uint16)[:64].astype(np.int64))[None]
    with torch.no_grad():
        base, _ = load_model(tiny_run)(ids)
        unmerged, _ = load_model(run, merge=False)(ids)
        merged, _ = load_model(run)(ids)
    assert (unmerged - base).abs().max() > 0.1
    assert (merged - unmerged).abs().max() < 1e-4
    # merged: the graph is the base's graph, no extra LoRA matmuls
    graph = onnx.load(tmp_path / "exp" / "onnx" / "model.onnx", load_external_data=False).graph
    base_graph = onnx.load(tiny_export / "onnx" / "model.onnx", load_external_data=False).graph
    assert sorted(n.op_type for n in graph.node) == sorted(n.op_type for n in base_graph.node)
    source = manifest.load(tmp_path / "exp")["source"]
    assert source["method"] == "lora"
    assert source["base"]["checkpoint"] == str(tiny_run.resolve())
    assert source["base"]["weights_sha256"] == manifest.sha256(tiny_run / "checkpoint" / "model.safetensors")
    assert source["adapter"]["sha256"] == manifest.sha256(run / "checkpoint" / "adapter_model.safetensors")


def test_lora_resume_matches_uninterrupted(lora_run, tiny_run, finetune_data, tmp_path):
    run, state = lora_run
    out = tmp_path / "resumed"
    finetune(tiny_run, finetune_data / "qa.jsonl", out, method="lora", progress=False, overrides=LORA, stop_after=15)
    resumed = finetune(tiny_run, finetune_data / "qa.jsonl", out, method="lora", progress=False, resume=True)
    assert resumed["step"] == state["step"] and resumed["val_loss"] == state["val_loss"]
    a = load_file(run / "checkpoint" / "adapter_model.safetensors")
    b = load_file(out / "checkpoint" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_on_prose_through_the_cli(tiny_run, finetune_data, tmp_path):
    from pipeline.convert.export import export

    out = tmp_path / "tiny-full"
    proc = onnxgen("finetune", tiny_run, "--data", finetune_data / "prose.txt", "--method", "full", "--out", out,
                   "--steps", 30, "--lr", 1e-3)
    trainable = load_model(tiny_run).num_parameters()
    assert f"{trainable:,} trainable parameters" in proc.stdout
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 30]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.3, history
    report = export(out, tmp_path / "exp")
    assert report.passed and report.results[0].max_abs <= 1e-4
    source = manifest.load(tmp_path / "exp")["source"]
    assert source["method"] == "full" and "adapter" not in source
    assert source["base"]["checkpoint"] == str(tiny_run.resolve())
    assert source["model_sha256"] == manifest.sha256(out / "checkpoint" / "model.safetensors")


def test_finetune_refuses_bad_input(tiny_run, lora_run, finetune_data, tmp_path):
    with pytest.raises(UserError, match="sha256 differs"):  # resuming on other data than it was prepared from
        finetune(tiny_run, finetune_data / "prose.txt", lora_run[0], method="lora", resume=True)
    with pytest.raises(UserError, match="--method lora"):
        finetune(tiny_run, finetune_data / "qa.jsonl", lora_run[0], method="full", resume=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(UserError, match="line 2"):
        finetune(tiny_run, bad, tmp_path / "a", method="lora", progress=False)
    assert not (tmp_path / "a").exists()  # nothing half-written
    with pytest.raises(UserError, match="only for --method lora"):
        finetune(tiny_run, finetune_data / "prose.txt", tmp_path / "b", method="full", lora=LoraSettings(rank=4))
    with pytest.raises(UserError, match="q_proj"):
        finetune(tiny_run, finetune_data / "prose.txt", tmp_path / "c", lora=LoraSettings(target_modules=("q_proj",)))
    with pytest.raises(UserError, match="--rank"):
        LoraSettings(rank=0)
    with pytest.raises(UserError, match="no fine-tune checkpoint"):
        finetune(tiny_run, finetune_data / "prose.txt", tmp_path / "d", resume=True)
    short = tmp_path / "short.txt"
    short.write_text("One line.\n\nAnother line.\n")
    with pytest.raises(UserError, match="tokens"):
        finetune(tiny_run, short, tmp_path / "e", method="full", progress=False)
    assert not (tmp_path / "e").exists()
