"""Where parity's reference comes from: the PyTorch model an export was made from, driven through the
graph contract, and the held-out token windows it is judged on.

    onnxgen run folder   our GPT (train/runs.load_model), windows from the run's data/valid.bin
    Hugging Face folder  the transformers model (safetensors only, no remote code), windows of a corpus
                         (the standard library by default) tokenized with the export's tokenizer
    GGUF file            the same, from the transformers folder train/gguf.py makes of it
"""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.exports import VARIANTS, generation_ids
from pipeline.tokenizer import EOT, load_tokenizer
from pipeline.train.corpus import load_corpus
from pipeline.train.gguf import is_gguf, stage_gguf
from pipeline.train.runs import load_model, read_tokens

def is_hf_folder(path: Path) -> bool:
    """A transformers model folder (config.json with a model_type), as opposed to an onnxgen run folder."""
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_hf_model(src: Path):
    """The fp32 PyTorch model, from safetensors only and without remote code (the folder is untrusted).
    Eager attention: the definitional math (transformers' SDPA path drops Gemma 2's soft-capping)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True, trust_remote_code=False,
                                                     attn_implementation="eager")
    return model.eval()


def load_gguf_model(path: Path):
    """The fp32 transformers model of a GGUF file, through a temporary transformers folder."""
    with tempfile.TemporaryDirectory(prefix="onnxgen-gguf-") as tmp:
        stage_gguf(path, tmp)
        return load_hf_model(Path(tmp))


def hf_windows(folder: Path, corpus: str | None, eos_id: int, n_windows: int, length: int) -> np.ndarray:
    """Held-out windows of `corpus` (None: the standard library), tokenized with the export's tokenizer.

    The same split onnxgen's own training holds out, so an imported model is judged on text it
    (most likely) did not see in our pipeline either."""
    tok = load_tokenizer(folder / "tokenizer.json", require_eot=False)
    ids: list[int] = []
    for enc in tok.encode_batch(load_corpus(corpus).valid, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return held_out_windows(np.asarray(ids, dtype=np.int64), n_windows, length)


def hf_cache_name(model) -> str:
    """The keyword a transformers model takes its KV cache by: `cache` in transformers 5.x's newer releases
    (5.25 warns on `past_key_values` at every call and says it goes in 5.40), `past_key_values` in 4.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def hf_cache_out(out):
    """The cache a transformers forward returned, under either name (reading `past_key_values` warns in 5.25)."""
    return out["cache"] if "cache" in out else out.past_key_values


def hf_reference(model):
    """The transformers model through the graph contract (past as a flat list of key/value tensors)."""
    from transformers import DynamicCache

    cache_name = hf_cache_name(model)  # once, not on every call

    def reference(ids, mask, pos, past):
        cache = DynamicCache()
        if past and past[0].shape[2] > 0:
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_name: cache})
        presents = hf_cache_out(out)
        return out.logits, [t for i in range(len(presents)) for t in (presents.layers[i].keys, presents.layers[i].values)]

    return reference


def hf_empty_past(folder: Path):
    """The reference's empty cache: fp32 zeros shaped as the fp32 graph's past inputs (heads, head size fixed)."""
    graph = onnx.load(str(folder / "onnx" / VARIANTS["fp32"]), load_external_data=False).graph
    shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input
              if i.name.startswith("past_key_values.")]

    def empty_past(batch: int):
        return [np.zeros((batch, s[1], 0, s[3]), np.float32) for s in shapes]
    return empty_past


# ----------------------------------------------------------------------------- onnxgen models

def gpt_reference(model):
    """The PyTorch model through the graph contract, for parity."""
    def reference(ids, mask, pos, past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = model.forward_with_cache(ids, mask, pos, pairs)
        return logits, [t for kv in presents for t in kv]

    def empty_past(batch):
        return [t.numpy() for kv in model.empty_cache(batch) for t in kv]
    return reference, empty_past


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
    if is_hf_folder(checkpoint) or is_gguf(checkpoint):  # `export --hf/--gguf`: the transformers model is the reference
        # the corpus recorded at import time, so every stage uses the same windows
        corpus = (manifest.load(folder).get("source") or {}).get("corpus")
        if model is None:
            model = load_gguf_model(checkpoint) if is_gguf(checkpoint) else load_hf_model(checkpoint)
        ids = generation_ids(folder)
        windows = hf_windows(folder, corpus, ids.eos[0], n_windows, length)
        return Source(str(checkpoint), hf_reference(model), hf_empty_past(folder), windows, ids.pad)
    model = load_model(checkpoint, merge=False)  # a LoRA fine-tune: the peft model itself, its adapter unmerged
    reference, empty_past = gpt_reference(model)
    pad = load_tokenizer(checkpoint).token_to_id(EOT)
    windows = run_windows(checkpoint, n_windows, length)
    return Source(str(checkpoint), reference, empty_past, windows, pad)


