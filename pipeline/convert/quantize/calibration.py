from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import manifest
from pipeline.check.parity import window_plan
from pipeline.check.sources import run_windows
from pipeline.errors import UserError
from pipeline.exports import past_names
from pipeline.train.runs import read_tokens

CALIBRATION_WINDOWS = 128  # GPTQ: windows of calibration text (seeded)

CALIBRATION_LENGTH = 256   # tokens per window (shorter when the context is)

CALIBRATION_SEED = 0


def text_windows(folder: Path, text: str, n: int, length: int, seed: int = 0) -> np.ndarray:
    """(≤ n, length) calibration windows: `text` tokenized with the export's tokenizer, cut into consecutive
    windows, n of them picked with `seed` (all of them when the text holds fewer)."""
    from pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(folder) / "tokenizer.json", require_eot=False)
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int64)
    count = len(ids) // length
    if count == 0:
        raise UserError(f"calibration text: {len(ids)} tokens, fewer than one window of {length}")
    pick = np.sort(np.random.default_rng(seed).permutation(count)[:n])
    return np.stack([ids[i * length:(i + 1) * length] for i in pick])


def calibration_data(folder: Path, text_file: str | Path | None, n: int, length: int,
                     checkpoint: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """(windows, what the manifest records) for GPTQ. From `text_file` when given; else from the export's
    recorded source: an import's corpus (its training split: parity judges on the held-out one), or a
    trained model's run (data/train.bin). The sha256 is of the text (or tokens) the windows were cut from."""
    import hashlib

    folder = Path(folder)
    source = manifest.load(folder).get("source") or {}
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise UserError(f"--calibration {path}: file does not exist")
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        windows = text_windows(folder, text, n, length, CALIBRATION_SEED)
        what = str(path)
    elif manifest.is_import(folder):
        from pipeline.train.corpus import load_corpus

        docs = load_corpus(source.get("corpus")).train
        order = np.random.default_rng(CALIBRATION_SEED).permutation(len(docs))
        picked, chars = [], 0
        for i in order:  # enough text for n windows (about 3 characters a token, twice over), not the whole corpus
            picked.append(docs[i])
            chars += len(docs[i])
            if chars >= 6 * n * length:
                break
        text = "\n\n".join(picked)
        data = text.encode("utf-8")
        windows = text_windows(folder, text, n, length, CALIBRATION_SEED)
        what = f"corpus {source.get('corpus') or 'stdlib'} (training split, {len(picked)} documents)"
    else:
        run = Path(checkpoint or source.get("checkpoint", ""))
        if not (run / "data" / "train.bin").is_file():
            raise UserError(f"--method gptq: no calibration text: pass --calibration TEXT_FILE (the source run's "
                            f"{run / 'data' / 'train.bin'} was not found)")
        tokens = read_tokens(run, "train").astype(np.int64)
        data = tokens.tobytes()
        count = len(tokens) // length
        pick = np.sort(np.random.default_rng(CALIBRATION_SEED).permutation(count)[:n])
        windows = np.stack([tokens[i * length:(i + 1) * length] for i in pick])
        what = f"{run / 'data' / 'train.bin'}"
    return windows, {"source": what, "sha256": hashlib.sha256(data).hexdigest(), "windows": int(len(windows)),
                     "window_length": int(windows.shape[1]), "seed": CALIBRATION_SEED}


class Windows:
    """CalibrationDataReader over (n, T) token windows, one window per call, empty past; shows progress."""

    def __init__(self, windows: np.ndarray, n_layer: int, n_head: int, head_dim: int, progress: bool):
        self.windows, self.past = windows, past_names(n_layer)
        self.shape = (1, n_head, 0, head_dim)
        self.bar = tqdm(total=len(windows), desc="calibrating int8", unit="window", disable=not progress)
        self.i = 0

    def get_next(self):
        if self.i == len(self.windows):
            self.bar.close()
            return None
        ids = self.windows[self.i: self.i + 1]
        self.i += 1
        self.bar.update(1)
        mask = np.ones_like(ids)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.arange(ids.shape[1])[None]}
        feed.update({n: np.zeros(self.shape, np.float32) for n in self.past})
        return feed

    def rewind(self):
        self.i = 0


def calibration_windows(run: Path, n_ctx: int, n: int = 32) -> np.ndarray:
    """(n, T) held-out windows that do not overlap the parity windows (sources.run_windows): taken from
    the gaps between them, so calibration never sees the tokens it is judged on."""
    valid = read_tokens(run, "valid").astype(np.int64)
    judged = run_windows(run, *window_plan(n_ctx))
    T = judged.shape[1]
    taken = np.zeros(len(valid), bool)
    starts = np.linspace(0, len(valid) - T - 1, len(judged)).astype(np.int64)
    for s in starts:
        taken[s: s + T + 1] = True
    csum = np.concatenate([[0], np.cumsum(taken)])
    fits = np.flatnonzero(csum[T:] - csum[:-T] == 0)  # starts whose T tokens are all untouched
    free, end = [], 0
    for start in fits:  # non-overlapping, first come first served
        if start >= end:
            free.append(int(start))
            end = start + T
    if not free:
        raise UserError(f"calibration: {run / 'data' / 'valid.bin'} has no held-out tokens outside the "
                        f"parity windows (need windows of {T} tokens)")
    pick = np.linspace(0, len(free) - 1, min(n, len(free))).astype(np.int64)
    return np.stack([valid[free[i]: free[i] + T] for i in pick])
