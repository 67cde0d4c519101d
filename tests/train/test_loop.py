"""Training: the loss falls, checkpoints are safetensors, a resumed run ends where an uninterrupted one does."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from pipeline.errors import UserError
from pipeline.train.loop import lr_at, TrainConfig, train


def test_loss_falls_and_artifacts_are_written(tiny_run):
    history = [json.loads(l) for l in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_loss"] < math.log(512) - 0.5  # well below uniform over the vocabulary
    for name in ("config.json", "train.json", "tokenizer.json", "loss.png", "checkpoint/model.safetensors",
                 "checkpoint/optimizer.safetensors", "checkpoint/state.json"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(tiny_run / "checkpoint" / "model.safetensors", "pt") as f:
        assert "wte.weight" in f.keys()


def test_schedule_warms_up_then_decays_to_min_lr():
    tc = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(99, tc) == pytest.approx(1e-4, rel=0.01)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 99))


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True])
def test_resume_reaches_the_same_loss_as_an_uninterrupted_run(tmp_path, corpus, bf16):
    """fp32 (the tiny preset) and bf16 autocast (the small preset, where the CPU has bf16) alike."""
    from pipeline.train.loop import bf16_available

    if bf16 and not bf16_available(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX): autocast stays off")
    overrides = {"steps": 30, "eval_interval": 10, "checkpoint_interval": 10, "bf16": bf16}
    whole = train(tmp_path / "whole", "tiny", str(corpus), overrides=overrides, progress=False)
    first = train(tmp_path / "split", "tiny", str(corpus), overrides=overrides, progress=False, stop_after=20)
    assert first["step"] == 20
    resumed = train(tmp_path / "split", resume=True, progress=False)
    assert resumed["step"] == 30
    assert resumed["val_loss"] == whole["val_loss"]  # same batches, same optimizer state: bit for bit
    assert resumed["train_loss"] == whole["train_loss"]


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path, tiny_run):
    with pytest.raises(UserError, match="--resume to continue"):
        train(tiny_run, "tiny")
    with pytest.raises(UserError, match="no checkpoint to resume"):
        train(tmp_path / "nothing", resume=True)
    with pytest.raises(UserError, match="preset nope: not found"):
        train(tmp_path / "x", "nope")
