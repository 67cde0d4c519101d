"""Data-parallel training under torchrun on CPU (gloo): 2 processes, each on half of every global
batch, must take the same steps as one process on the whole batch.

Tolerance: |Δ loss| <= 1e-5. Nothing differs but the order of float32 sums: each rank sums its
half and the gradients are averaged by an all-reduce, where one process sums the whole batch, and
torchrun runs each rank on one thread (OMP_NUM_THREADS=1), which changes the blocking of the
matmuls. Measured: 2.4e-7 after the 60 steps of `tiny`. A real fault -- a rank training on the
other's rows, a loss averaged per rank instead of per counted target, gradients not synchronised
-- moves the loss by 1e-3 to 1e-1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_CORPUS
from pipeline.train.finetune import LoraSettings, finetune

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5


def torchrun(*args, nproc=2):
    """`torchrun --standalone --nproc-per-node 2 -m pipeline.cli ARGS` (the module form of torchrun)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_train_on_two_processes_matches_one(tiny_run, tmp_path):
    out = tmp_path / "tiny-ddp"
    proc = torchrun("train", "--preset", "tiny", "--corpus", TEST_CORPUS, "--out", out)
    # the same run as the session's single-process `tiny` (same preset, corpus, seed and tokenizer)
    assert json.loads((out / "train.json").read_text()) == json.loads((tiny_run / "train.json").read_text())
    assert (out / "tokenizer.json").read_text() == (tiny_run / "tokenizer.json").read_text()
    two, one = history(out), history(tiny_run)
    assert [h["step"] for h in two] == [h["step"] for h in one] == [20, 40, 60]  # rank 0 alone wrote
    for a, b in zip(two, one):
        assert abs(a["val_loss"] - b["val_loss"]) <= TOLERANCE, (a, b)
        assert abs(a["train_loss"] - b["train_loss"]) <= TOLERANCE, (a, b)
    assert proc.stdout.count("trained ") == 1
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == \
        ["model.safetensors", "optimizer.safetensors", "state.json"]


def test_lora_finetune_on_two_processes_matches_one(tiny_run, finetune_data, tmp_path):
    # JSONL: the counted (completion) targets fall unevenly between the ranks' rows, so this checks
    # that the loss is normalised by the global count. LoRA dropout off: its random masks are drawn
    # per rank and could not match one process's.
    args = dict(steps=10, lr=1e-2)
    one = finetune(tiny_run, finetune_data / "qa.jsonl", tmp_path / "one", method="lora",
                   lora=LoraSettings(dropout=0.0), progress=False, overrides=args)
    torchrun("finetune", tiny_run, "--data", finetune_data / "qa.jsonl", "--method", "lora", "--dropout", 0,
             "--out", tmp_path / "two", "--steps", 10, "--lr", 1e-2)
    a, b = history(tmp_path / "two"), history(tmp_path / "one")
    assert [h["step"] for h in a] == [h["step"] for h in b] == [0, 10]
    assert abs(a[-1]["val_loss"] - one["val_loss"]) <= TOLERANCE, (a, one)
    assert abs(a[-1]["train_loss"] - b[-1]["train_loss"]) <= TOLERANCE, (a, b)
    assert a[-1]["val_loss"] < a[0]["val_loss"]  # it did train
