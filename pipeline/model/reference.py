"""The PyTorch models an export is judged against, driven through the graph contract
(docs/contract.md): (ids, mask, pos, past) tensors in, (logits, presents) out, past and presents as a
flat list of key/value tensors.

    transformers folder  the transformers model (safetensors only, no remote code)
    GGUF file            the same, from the transformers folder model/gguf.py makes of it
    onnxgen run          our GPT (model/gpt.py), its LoRA adapter unmerged when it has one
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch

from pipeline.model.gguf import is_gguf, stage_gguf


def checkpoint_kind(path: str | Path) -> str:
    """What a checkpoint path is: "gguf" (llama.cpp's file), "hf" (a transformers folder) or "run" (an onnxgen
    run folder). The one place that tells them apart; the manifest records the answer as source.kind."""
    if is_gguf(path):
        return "gguf"
    return "hf" if is_hf_folder(Path(path)) else "run"


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
    if {"conv", "linear_attention"} & set(getattr(model.config, "layer_types", None) or ()):
        return _hf_state_reference(model, cache_name)

    def reference(ids, mask, pos, past):
        cache = DynamicCache()
        if past and past[0].shape[2] > 0:
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_name: cache})
        presents = hf_cache_out(out)
        return out.logits, [t for i in range(len(presents)) for t in (presents.layers[i].keys, presents.layers[i].values)]

    return reference


def gpt_reference(model):
    """The PyTorch model through the graph contract, for parity."""
    def reference(ids, mask, pos, past):
        decoder = getattr(model, "split_cache", None)  # a LoRA run's peft wrapper has our GPT beneath
        pairs = decoder(past) if decoder else [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = model.forward_with_cache(ids, mask, pos, pairs)
        return logits, [t for kv in presents for t in kv]

    def empty_past(batch):
        return [t.numpy() for kv in model.empty_cache(batch) for t in kv]
    return reference, empty_past


def _hf_state_reference(model, cache_name: str):
    """hf_reference for LFM2, Granite 4 and Qwen3.5, whose conv, mamba and linear_attention layers carry state:
    past and presents flat in the graph's order (exports.cache_names), a convolution's (B, C, kernel - 1) where
    transformers keeps kernel inputs. Its oldest one is never read again, so a zero column in its place gives
    transformers' own math. The SSM (Granite 4: transformers calls its mamba layers "linear_attention") and
    recurrent (Qwen3.5) states are transformers' own."""
    from transformers import DynamicCache

    kinds = list(model.config.layer_types)

    def reference(ids, mask, pos, past):
        cache, k, layers = DynamicCache(config=model.config), 0, []
        for kind in kinds:
            n = 1 if kind == "conv" else 2  # K and V, or a linear layer's conv and recurrent states
            layers.append(past[k:k + n])
            k += n
        attention = [entries for kind, entries in zip(kinds, layers) if kind not in ("conv", "linear_attention")]
        P = attention[0][0].shape[2] if attention else mask.shape[1] - ids.shape[1]
        if P > 0:  # the first step's state is zeros, as transformers starts
            for i, (kind, entries) in enumerate(zip(kinds, layers)):
                if kind in ("conv", "linear_attention"):
                    layer = cache.layers[i]
                    state = torch.nn.functional.pad(entries[0], (1, 0))
                    layer.update_conv_state(state, conv_kernel_size=state.shape[-1])
                    layer.cumulative_length_linear.fill_(P)
                    if kind == "linear_attention":
                        layer.update_recurrent_state(entries[1])
                else:
                    cache.update(entries[0], entries[1], i)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_name: cache})
        presents, flat = hf_cache_out(out), []
        for i, kind in enumerate(kinds):
            layer = presents.layers[i]
            if kind == "conv":
                flat += [layer.conv_states[0][:, :, 1:]]
            elif kind == "linear_attention":
                flat += [layer.conv_states[0][:, :, 1:], layer.recurrent_states[0]]
            else:
                flat += [layer.keys, layer.values]
        return out.logits, flat

    return reference
