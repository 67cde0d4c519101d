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
def finetune_data(tmp_path_factory) -> Path:
    """Fine-tuning data unlike the base corpus (Python source): prose.txt, English paragraphs from a
    small grammar, and qa.jsonl, prompt/completion pairs with a fixed answer per question."""
    import json
    import random

    folder = tmp_path_factory.mktemp("finetune_data")
    r = random.Random(0)
    subjects = ["The old sailor", "A quiet child", "My neighbour", "The tired farmer", "Her grandmother",
                "The young painter", "A stranger", "The baker", "His sister", "The teacher"]
    verbs = ["walked slowly to", "dreamed about", "painted", "sang softly near", "remembered", "looked across",
             "wrote a letter about", "waited beside", "laughed at", "carried flowers to"]
    objects = ["the green river", "a small garden", "the distant hills", "the empty church", "an old bridge",
               "the morning market", "a field of wheat", "the silent harbour", "the village square", "the sea"]
    endings = ["before the sun went down.", "while the bells rang.", "and smiled at nobody.", "in the cold rain.",
               "on a bright summer day.", "as the wind grew stronger.", "without saying a word.", "every evening."]
    paragraphs = [" ".join(f"{r.choice(subjects)} {r.choice(verbs)} {r.choice(objects)} {r.choice(endings)}"
                           for _ in range(r.randint(3, 5))) for _ in range(80)]
    (folder / "prose.txt").write_text("\n\n".join(paragraphs) + "\n")
    colours = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red",
               "orange": "orange", "cloud": "grey", "rose": "pink", "violet": "purple"}
    rows = []
    for _ in range(120):
        thing = r.choice(sorted(colours))
        rows.append({"prompt": f"Question: what colour is the {thing}?\nAnswer:",
                     "completion": f" The {thing} is {colours[thing]}."})
    (folder / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
