"""The run folder (models/NAME/): what a training or fine-tuning run leaves, and how later stages read it.

    config.json          the model config (GPTConfig)
    train.json           the training config and the corpus it saw (finetune.json for a fine-tune)
    tokenizer.json       the byte-level BPE
    data/train.bin       token ids (uint16, or uint32 above 65,536 tokens: tokenizer.token_dtype),
    data/valid.bin       the held-out split (parity and calibration read it too)
    checkpoint/          model.safetensors (or a LoRA adapter), optimizer.safetensors, state.json
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.tokenizer import token_dtype
from pipeline.model.gpt import GPT, GPTConfig

ADAPTER, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def read_tokens(run: str | Path, split: str) -> np.ndarray:
    """data/{split}.bin of a run, in the dtype its vocabulary was written with."""
    run = Path(run)
    vocab = GPTConfig.load(run / "config.json").vocab_size
    return np.fromfile(run / "data" / f"{split}.bin", dtype=token_dtype(vocab))


def checkpoint_dir(run: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives only a kill in the middle of the swap
        if (run / name / "state.json").is_file():
            return run / name
    return None


def load_model(run: str | Path, merge: bool = True) -> GPT:
    """The trained model of a run folder, in eval mode. Reads safetensors only.

    A LoRA fine-tune's run holds an adapter, not weights: its base plus the adapter, merged into
    plain Linear weights (merge=False keeps peft's unmerged LoRA layers: parity's reference)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"checkpoint {run}: folder does not exist")
    config = GPTConfig.load(run / "config.json")
    ckpt = checkpoint_dir(run)
    if ckpt is None:
        raise UserError(f"checkpoint {run}: has no checkpoint/ with model.safetensors (train it first)")
    if (ckpt / "adapter_config.json").is_file():
        return load_lora_run(run, ckpt, merge)
    model = GPT(config)
    load_weights(model, ckpt / "model.safetensors")
    return model.eval()


def load_weights(model: GPT, path: Path) -> None:
    try:
        weights = load_file(path)
    except Exception as e:
        raise UserError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    got = {k: v.shape for k, v in weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise UserError(f"checkpoint {path}: does not match its config.json "
                        f"(missing {missing}, wrong shapes {[(k, tuple(got[k]), tuple(expected[k])) for k in wrong]})")
    model.load_state_dict(weights, strict=False)


def weights_sha256(run: Path) -> str:
    """The sha256 of a run's weights file: model.safetensors, or a LoRA run's adapter."""
    ckpt = checkpoint_dir(Path(run))
    assert ckpt is not None
    path = ckpt / "model.safetensors"
    return manifest.sha256(path if path.is_file() else ckpt / ADAPTER)


def adapter_files(peft_model) -> dict:
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return {ADAPTER: get_peft_model_state_dict(peft_model), ADAPTER_CONFIG: json.dumps(config, indent=2) + "\n"}


def load_adapter(peft_model, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(ckpt / ADAPTER)
    except Exception as e:
        raise UserError(f"checkpoint {ckpt / ADAPTER}: not a readable safetensors file ({e})") from None
    expected = set(adapter_files(peft_model)[ADAPTER])
    if set(weights) != expected:
        raise UserError(f"checkpoint {ckpt / ADAPTER}: does not match its adapter_config.json "
                        f"(missing {sorted(expected - set(weights))[:3]}, extra {sorted(set(weights) - expected)[:3]})")
    set_peft_model_state_dict(peft_model, weights)


def load_lora_run(run: Path, ckpt: Path, merge: bool = True) -> GPT:
    """Base + adapter, in eval mode: merged into plain Linear weights (what export writes), or with
    peft's LoRA layers unmerged (parity's reference: base(x) + B(A(x)) * alpha / r)."""
    from peft import LoraConfig, get_peft_model

    spec = json.loads((run / "finetune.json").read_text())
    base = Path(spec["base"]["checkpoint"])
    if checkpoint_dir(base) is None:
        raise UserError(f"checkpoint {run}: its base {base} has no checkpoint (moved or deleted?)")
    if weights_sha256(base) != spec["base"]["weights_sha256"]:
        raise UserError(f"checkpoint {run}: its base {base} changed since the fine-tune "
                        "(weights sha256 differs); the adapter only fits the weights it was trained on")
    peft_model = get_peft_model(load_model(base), LoraConfig.from_pretrained(str(ckpt)))
    load_adapter(peft_model, ckpt)
    peft_model.eval()
    if merge:
        return peft_model.merge_and_unload().eval()
    return peft_model.get_base_model().eval()


def source_details(run: Path) -> dict:
    """For an export's manifest: the method, the base checkpoint and the adapter of a fine-tuned run."""
    spec_path = Path(run) / "finetune.json"
    if not spec_path.is_file():
        return {}
    spec = json.loads(spec_path.read_text())
    details = {"kind": "onnxgen-finetune", "method": spec["method"], "base": spec["base"], "data": spec["data"]}
    ckpt = checkpoint_dir(Path(run))
    if ckpt is not None and (ckpt / ADAPTER).is_file():
        details["adapter"] = {"file": str((ckpt / ADAPTER).resolve()), "sha256": manifest.sha256(ckpt / ADAPTER),
                              "config_sha256": manifest.sha256(ckpt / ADAPTER_CONFIG), "lora": spec["lora"]}
    return details
