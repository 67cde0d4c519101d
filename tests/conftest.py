"""Shared fixtures: one tiny model trained and exported once per test session.

The corpus is a slice of the standard library (the email package, ~2 MB) so the tokenizer and a
short training run take seconds; the `tiny` preset is trained for real (flat random-weight logits
would make parity agreement meaningless).
"""
from __future__ import annotations

import hashlib
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


def snapshot(*folders: Path) -> dict:
    """Every file under `folders`: (size, mtime_ns, sha256). Symlinks as their targets."""
    snap = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_symlink():
                snap[str(p)] = ("->", os.readlink(p))
            elif p.is_file():
                st = p.stat()
                snap[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                snap[str(p)] = "dir"
    return snap


def assert_user_error(proc, *words: str) -> str:
    """Exit 2, one line `error: ...` mentioning each of `words`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


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
