"""manifest.json: every file's sha256 and size, the stage that made it, tool versions, the source
checkpoint and the parity results. Stages add to it; `verify` checks a folder against it."""
from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path

from pipeline.errors import UserError
from pipeline.exports import write_json

MANIFEST = "manifest.json"
_TOOLS = ("onnxgen", "torch", "onnx", "onnxruntime", "tokenizers", "transformers", "optimum-onnx", "peft")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_kind(folder: Path) -> str:
    """What the export in `folder` was made from, as its export stage recorded it: "hf" (a transformers folder),
    "gguf" (llama.cpp's file) or "run" (a model trained here; also an export that recorded no source)."""
    return (load(folder).get("source") or {}).get("kind") or "run"


def is_import(folder: Path) -> bool:
    """An imported model (transformers folder or GGUF), whose variants follow the import recipes and bars."""
    return source_kind(folder) in ("hf", "gguf")


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def load(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"files": {}, "stages": []}
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest {path}: not valid JSON ({e})") from None
    if not (isinstance(m, dict) and isinstance(m.get("files", {}), dict)
            and all(isinstance(e, dict) and {"sha256", "bytes"} <= set(e) for e in m.get("files", {}).values())):
        raise UserError(f"manifest {path}: expected an object whose 'files' maps paths to {{sha256, bytes}}")
    m.setdefault("files", {})
    return m


def record(folder: Path, stage: str, files: list[str], **details) -> dict:
    """Hash `files` (relative to folder) as made by `stage`, log the stage, rewrite the manifest atomically."""
    folder = Path(folder)
    m = load(folder)
    m.setdefault("files", {})
    for rel in files:
        p = folder / rel
        m["files"][rel] = {"sha256": sha256(p), "bytes": p.stat().st_size, "stage": stage}
    m["files"] = {k: m["files"][k] for k in sorted(m["files"]) if (folder / k).exists()}
    m["tools"] = tool_versions()
    m.setdefault("stages", []).append({"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details})
    for key in ("source", "parity"):
        if key in details:
            m[key] = details[key]
    write_json(folder / MANIFEST, m)
    return m


def verify(folder: Path, files: list[str] | None = None) -> None:
    """Raise UserError unless each file (default: all listed) matches its recorded sha256 and size."""
    folder = Path(folder)
    m = load(folder)
    if not m["files"]:
        raise UserError(f"manifest {folder / MANIFEST}: missing or lists no files (pass --unsafe-skip-verify to skip, unsafe)")
    for rel in files if files is not None else list(m["files"]):
        entry = m["files"].get(rel)
        p = folder / rel
        if entry is None:
            raise UserError(f"{p}: not listed in the manifest (pass --unsafe-skip-verify to skip, unsafe)")
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing")
        if p.stat().st_size != entry["bytes"] or sha256(p) != entry["sha256"]:
            raise UserError(f"{p}: sha256 does not match the manifest (file changed or corrupt)")
