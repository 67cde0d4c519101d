"""kill -9 during `onnxgen quantize` (issue 3): no partial variant, no changed existing file, and
the next quantize finishes. Written before issue 3 is merged: it skips until pipeline/quantize.py
exists, then runs against the real command."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from conftest import onnxgen, snapshot
from test_interrupt import kill_when, start

from pipeline import manifest
from pipeline.exports import VARIANTS

pytest.importorskip("pipeline.convert.quantize", reason="`onnxgen quantize` arrives with issue 3")


@pytest.mark.slow
def test_kill_during_quantize_keeps_every_variant_whole(tiny_export, tmp_path):
    folder = shutil.copytree(tiny_export, tmp_path / "exports" / "tiny", copy_function=shutil.copy2)
    before = snapshot(folder)

    def something_new():  # the quantizer has started writing (in the folder or beside it)
        return any(str(p) not in before for p in folder.rglob("*")) or any(
            p != folder for p in folder.parent.iterdir())

    proc = start("quantize", folder, "--variant", "int8")
    kill_when(proc, something_new, "quantize to start writing")

    after = snapshot(folder)
    changed = [p for p in before if p in after and after[p] != before[p]]
    assert changed in ([], [str(folder / "manifest.json")]), f"existing files changed: {changed}"
    assert all(p in after for p in before), "an existing file disappeared"
    manifest.verify(folder)  # every file the manifest lists is whole
    new = [Path(p) for p in after if p not in before and not Path(p).name.startswith(".") and Path(p).is_file()]
    for p in new:  # a variant that is there must be whole, not half-written
        assert p.parent.name == "onnx" and p.name in {*VARIANTS.values(), *(v + "_data" for v in VARIANTS.values())}, p
        if p.suffix == ".onnx":
            onnx.checker.check_model(str(p), full_check=False)

    onnxgen("-q", "quantize", folder, "--variant", "int8")
    manifest.verify(folder)
    proc = onnxgen("run", folder, "def f(", "--variant", "int8", "--max-new-tokens", "4")
    assert proc.stdout.startswith("def f(")
    assert not [p for p in folder.parent.iterdir() if p != folder], "the next quantize left temporary files beside"
