"""kill -9 at the worst moments, with real subprocesses: training loses at most one checkpoint
interval and resumes to the same final loss; an export leaves no partial folder and does not
change the export it was replacing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, onnxgen, snapshot

from pipeline import manifest


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-q", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300.0) -> None:
    """SIGKILL `proc` as soon as ready() is true (polled every millisecond or so)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{what}: the process had already ended (exit {proc.returncode})"


def step_of(checkpoint: Path) -> int:
    try:
        return json.loads((checkpoint / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


@pytest.mark.slow
def test_kill_during_training_then_resume_reaches_the_same_loss(tiny_run, corpus, tmp_path):
    """tiny preset: 60 steps, a checkpoint every 20. The kill lands while the step-40 checkpoint is
    being written (checkpoint.tmp/ beside a whole checkpoint/), the worst moment for it."""
    from safetensors.numpy import load_file

    from pipeline.train.runs import checkpoint_dir

    out = tmp_path / "run"
    interval = json.loads((tiny_run / "train.json").read_text())["train"]["checkpoint_interval"]
    proc = start("train", "--preset", "tiny", "--corpus", corpus, "--out", out)
    seen = []

    def saving_second_checkpoint():
        whole = step_of(out / "checkpoint")
        if whole > 0 and not seen:
            seen.append(whole)
        return whole >= interval and ((out / "checkpoint.tmp").exists() or whole >= 2 * interval)

    kill_when(proc, saving_second_checkpoint, "the second checkpoint")
    ckpt = checkpoint_dir(out)
    assert ckpt is not None, "the kill lost every checkpoint"
    kept = step_of(ckpt)
    # the kill came at step >= 2 * interval: what survives is at most one interval behind it
    assert kept in (interval, 2 * interval), kept
    assert kept >= seen[0]

    proc = onnxgen("-q", "train", "--out", out, "--resume")
    assert f"step {json.loads((tiny_run / 'train.json').read_text())['train']['steps']}" in proc.stdout

    # the same seed, the same batches: the resumed run ends where the uninterrupted one (tiny_run) did
    assert (out / "tokenizer.json").read_bytes() == (tiny_run / "tokenizer.json").read_bytes()
    resumed = json.loads((out / "checkpoint" / "state.json").read_text())
    reference = json.loads((tiny_run / "checkpoint" / "state.json").read_text())
    assert resumed["step"] == reference["step"]
    # Tolerance: exact. Batches come from (seed, step), the optimizer state and torch's RNG are saved
    # bit for bit, and CPU kernels are deterministic for the same thread count.
    assert resumed["val_loss"] == reference["val_loss"]
    assert resumed["train_loss"] == reference["train_loss"]
    a, b = load_file(out / "checkpoint" / "model.safetensors"), load_file(tiny_run / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_kill_during_export_leaves_no_partial_folder_and_keeps_the_old_one(tiny_run, tiny_export, tmp_path):
    exports = tmp_path / "exports"
    existing = shutil.copytree(tiny_export, exports / "tiny", copy_function=shutil.copy2)
    before = snapshot(existing)

    def temp_has(name):
        return lambda: any((p / name).exists() for p in exports.glob(".tiny.tmp-*"))

    # early: while the graph is being exported; late: while parity runs on the finished files
    for marker in ("onnx", "manifest.json"):
        proc = start("export", tiny_run, "--out", existing, "--force")
        kill_when(proc, temp_has(marker), f"the temporary folder's {marker}")
        assert snapshot(existing) == before, f"killed at {marker}: the existing export changed"
        assert sorted(p.name for p in exports.iterdir() if not p.name.startswith(".")) == ["tiny"]
        manifest.verify(existing)

    # what a killed process leaves is a hidden temporary folder; the next export clears it
    assert list(exports.glob(".tiny.tmp-*"))
    onnxgen("-q", "export", tiny_run, "--out", existing, "--force")
    assert sorted(p.name for p in exports.iterdir()) == ["tiny"]
    manifest.verify(existing)
    assert snapshot(existing) != before  # it was really replaced this time


def test_an_export_moved_aside_by_a_killed_process_comes_back(tmp_path):
    """The one instant of a --force export where the old folder is aside and the new not yet in place."""
    from pipeline.exports import clear_interrupted

    out = tmp_path / "tiny"
    aside = tmp_path / ".tiny.old-999999999-1"  # pid above pid_max: a process that is gone
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    live = tmp_path / f".tiny.tmp-{os.getpid()}-abc"  # a build in progress in a live process: kept
    live.mkdir()
    clear_interrupted(out)
    assert (out / "config.json").read_text() == "{}"
    assert not aside.exists() and live.exists()


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_then_auto_resume_starts_again(corpus, tmp_path):
    """`make export` trains with --auto-resume: a run killed before it had a checkpoint must not
    leave a folder that blocks it (nothing to resume, yet "not empty")."""
    out = tmp_path / "run"
    proc = start("train", "--preset", "tiny", "--corpus", corpus, "--out", out, "--steps", "5")
    kill_when(proc, lambda: (out / "train.json").exists(), "the run folder to be prepared")
    if (out / "checkpoint").exists():
        pytest.fail("the kill came after the first checkpoint; this test needs it before")
    proc = onnxgen("-q", "train", "--preset", "tiny", "--corpus", corpus, "--out", out, "--steps", "5",
                   "--auto-resume")
    assert "step 5" in proc.stdout
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5
