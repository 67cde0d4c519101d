"""The README's Python snippets name modules and objects that exist (its `from pipeline.runtime import
OnnxLM` outlived the layout change of issue 8 by several stops)."""
from __future__ import annotations

import importlib
import re

from conftest import ROOT


def test_readme_python_imports_exist():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    imports = [(m, [n.strip() for n in names.split(",")]) for b in blocks
               for m, names in re.findall(r"^from (pipeline[\w.]*) import ([\w, ]+)$", b, re.M)]
    assert imports, "the README has Python snippets that import from pipeline"
    for module, names in imports:
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name), f"README: from {module} import {name}: {module} has no {name}"


def test_docs_name_files_that_exist():
    """Every source, test or benchmark file the README, docs/ and benchmarks/ notes name is there (five paths
    from before issue 8's layout change were still in docs/ and the benchmark notes)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
    named = {(page.name, path) for page in pages
             for path in re.findall(r"\b((?:pipeline|tests|benchmarks)/[\w/]+\.py)\b", page.read_text())}
    assert len(named) > 20
    missing = sorted(f"{page}: {path}" for page, path in named if not (ROOT / path).is_file())
    assert not missing, missing
