"""Where parity's reference comes from: the PyTorch model an export was made from, driven through the
graph contract, and the held-out token windows it is judged on.

    onnxgen run folder   our GPT (train/runs.load_model), windows from the run's data/valid.bin
    Hugging Face folder  the transformers model (safetensors only, no remote code), windows of a corpus
                         (the standard library by default) tokenized with the export's tokenizer
    GGUF file            the same, from the transformers folder model/gguf.py makes of it
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.exports import VARIANTS, generation_ids, is_state, read_graph_only
from pipeline.model.reference import checkpoint_kind, gpt_reference, hf_reference, load_gguf_model, load_hf_model
from pipeline.tokenizer import EOT, load_tokenizer, prompt_prefix, prompt_tokenizer
from pipeline.train.corpus import load_corpus
from pipeline.train.runs import load_model, read_tokens


def hf_windows(folder: Path, corpus: str | None, eos_id: int, n_windows: int, length: int) -> np.ndarray:
    """Held-out windows of `corpus` (None: the standard library), tokenized with the export's tokenizer, each
    starting as `onnxgen run` starts a text prompt: with the ids the tokenizer puts first (a BOS, where the
    model's tokenizer adds one; tokenizer.prompt_tokenizer), so parity judges the graphs on what they are fed.

    The same split onnxgen's own training holds out, so an imported model is judged on text it
    (most likely) did not see in our pipeline either."""
    tok = prompt_tokenizer(folder)
    prefix = prompt_prefix(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(load_corpus(corpus).valid, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    windows = held_out_windows(np.asarray(ids, dtype=np.int64), n_windows, length - len(prefix))
    return np.concatenate([np.tile(np.asarray(prefix, np.int64), (len(windows), 1)), windows], axis=1)


def hf_empty_past(folder: Path):
    """The reference's empty cache: fp32 zeros shaped as the fp32 graph's past inputs (heads, head size fixed),
    in the graph's order: K/V of length 0, a fixed-size state (LFM2's past_conv.*) of zeros."""
    graph = read_graph_only(folder / "onnx" / VARIANTS["fp32"]).graph
    shapes = [(is_state(i.name), [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input
              if i.name.startswith("past")]

    def empty_past(batch: int):
        return [np.zeros((batch, *s[1:]) if state else (batch, s[1], 0, s[3]), np.float32) for state, s in shapes]
    return empty_past


# ----------------------------------------------------------------------------- onnxgen models

def run_windows(run: Path, n_windows: int, length: int) -> np.ndarray:
    return held_out_windows(read_tokens(run, "valid"), n_windows, length)


# ----------------------------------------------------------------------------- either

def held_out_windows(valid_ids: np.ndarray, n_windows: int, length: int) -> np.ndarray:
    """(n_windows, length) windows at evenly spaced offsets of the held-out split: deterministic."""
    if len(valid_ids) < length + 1:
        raise UserError(f"held-out data: {len(valid_ids)} tokens, fewer than one window of {length}")
    starts = np.linspace(0, len(valid_ids) - length - 1, n_windows).astype(np.int64)
    return np.stack([valid_ids[s: s + length] for s in starts]).astype(np.int64)


@dataclass
class Source:
    """The PyTorch model an export came from, driven through the graph contract, and its held-out windows."""
    name: str
    reference: Callable      # (ids, mask, pos, past) torch tensors -> (logits, presents)
    empty_past: Callable     # batch -> list of (batch, kv_heads, 0, head_dim) fp32 arrays
    windows: np.ndarray      # (n, T) int64
    pad_id: int


def open_source(folder: Path, checkpoint: Path, n_windows: int, length: int, model=None) -> Source:
    """The reference for the export in `folder`: an onnxgen run folder or a Hugging Face folder, with
    `n_windows` held-out windows of `length` tokens (parity.window_plan leaves room in the context)."""
    folder, checkpoint = Path(folder), Path(checkpoint)
    kind = checkpoint_kind(checkpoint)
    if kind != "run":  # `export --hf/--gguf`: the transformers model is the reference
        # the corpus recorded at import time, so every stage uses the same windows
        corpus = (manifest.load(folder).get("source") or {}).get("corpus")
        if model is None:
            model = load_gguf_model(checkpoint) if kind == "gguf" else load_hf_model(checkpoint)
        ids = generation_ids(folder)
        windows = hf_windows(folder, corpus, ids.eos[0], n_windows, length)
        return Source(str(checkpoint), hf_reference(model), hf_empty_past(folder), windows, ids.pad)
    model = load_model(checkpoint, merge=False)  # a LoRA fine-tune: the peft model itself, its adapter unmerged
    reference, empty_past = gpt_reference(model)
    pad = load_tokenizer(checkpoint).token_to_id(EOT)
    windows = run_windows(checkpoint, n_windows, length)
    return Source(str(checkpoint), reference, empty_past, windows, pad)


