"""Shared fixtures: one tiny model trained and exported once per test session.

The corpus is a slice of the standard library (the email package, ~2 MB) so the tokenizer and a
short training run take seconds; the `tiny` preset is trained for real (flat random-weight logits
would make parity agreement meaningless).
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEST_CORPUS = STDLIB / "email"
ROOT = Path(__file__).resolve().parent.parent


def onnxgen(*args, check=True, input=None, timeout=600, env=None):
    """Run the real console entry point in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"onnxgen {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def corpus() -> Path:
    return TEST_CORPUS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    from pipeline.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(out, preset="tiny", corpus=str(TEST_CORPUS), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    from pipeline.export import export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def tiny_fused_export(tiny_export, tmp_path_factory) -> Path:
    """A copy of tiny_export with the fused-attention twin of its fp32 graph (onnxgen fuse)."""
    import shutil

    from pipeline.fuse import fuse_export

    out = tmp_path_factory.mktemp("exports") / "tiny_fused"
    shutil.copytree(tiny_export, out)
    fuse_export(out, ["fp32"])
    return out
