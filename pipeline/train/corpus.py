"""Corpus: find the documents, read them as text, split a held-out validation set.

The default corpus is the Python standard library's own source (found through sysconfig, tests and
site-packages left out), so a fresh machine trains with nothing to download.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.tokenizer import EOT

log = logging.getLogger(__name__)

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".json", ".jsonl", ".js", ".ts", ".c", ".h", ".html", ".css",
                  ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".csv", ".tex"}


def default_corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(stdlib).parts[:-1]))]
    return sorted(files)


def resolve_corpus(spec: str | None) -> list[Path]:
    """A file, a folder (its text files, recursively) or a glob; None means the standard library."""
    if spec is None:
        files = default_corpus_files()
        if not files:
            raise UserError("corpus: no Python source found in the standard library; pass --corpus")
        return files
    path = Path(spec)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    else:
        raise UserError(f"corpus {spec}: no such file, folder or glob")
    if not files:
        raise UserError(f"corpus {spec}: matched no text files (expected a file, a folder of text files or a glob)")
    return files


@dataclass
class Corpus:
    train: list[str]   # documents
    valid: list[str]
    files: int
    bytes: int
    replaced: int      # bytes that were not UTF-8 and became U+FFFD

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc in self.train + [EOT] + self.valid:
            h.update(doc.encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]


def _read(path: Path) -> tuple[str, int]:
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text:
        # count what was replaced, not U+FFFD that was already in the file
        replaced = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    else:
        replaced = 0
    return text, replaced


def load_corpus(spec: str | None = None, valid_fraction: float = 0.05, seed: int = 0) -> Corpus:
    """One document per file; a corpus of few files holds out the tail of its text instead."""
    files = resolve_corpus(spec)
    docs, total, replaced = [], 0, 0
    for f in files:
        text, bad = _read(f)
        total += len(text.encode("utf-8"))
        replaced += bad
        if text.strip():
            docs.append(text)
    if not docs or sum(len(d) for d in docs) < 64:
        raise UserError(f"corpus {spec or 'stdlib'}: empty (needs at least 64 characters of text)")
    if replaced > 0.1 * total:
        raise UserError(f"corpus {spec}: {replaced} of {total} bytes are not UTF-8; expected text, not binary")
    if replaced:
        log.warning("corpus: %d bytes were not UTF-8 and were replaced with U+FFFD", replaced)
    # Deterministic split by hashing each document's index with the seed: stable across runs and machines.
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    if len(docs) >= 20:
        n_valid = max(1, int(len(docs) * valid_fraction))
        valid_idx = set(order[:n_valid])
        train = [d for i, d in enumerate(docs) if i not in valid_idx]
        valid = [d for i, d in enumerate(docs) if i in valid_idx]
    else:
        # Too few documents to hold some out whole: hold out the tail of the text instead.
        text = EOT.join(docs)
        cut = int(len(text) * (1 - max(valid_fraction, 0.1)))
        train, valid = [text[:cut]], [text[cut:]]
    return Corpus(train=train, valid=valid, files=len(files), bytes=total, replaced=replaced)
