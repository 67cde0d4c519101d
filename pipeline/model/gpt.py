"""The model onnxgen trains: GPT-2's architecture, one configuration of the decoder (model/decoder.py).

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, ...) so a checkpoint
converts to a GPT2LMHeadModel by transposing the Linear weights (GPT-2 stores Conv1D as (in, out)).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.errors import UserError
from pipeline.model.decoder import Decoder, DecoderConfig


def from_known_keys(cls, d: dict, what: str):
    """cls(**d) for a config dataclass; a key it does not have is the user's typo, not a TypeError."""
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"{what}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
    return cls(**d)


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    n_ctx: int = 256          # context length: the largest position id + 1
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # "gelu" (tanh approximation, as GPT-2) or "relu"
    positional: str = "learned"  # "learned" or "sinusoidal" (fixed, as in Vaswani et al.)
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.n_ctx > 0, "n_ctx must be positive"),
            (self.n_layer > 0, "n_layer must be positive"),
            (self.n_head > 0 and self.n_embd > 0, "n_head and n_embd must be positive"),
            (self.n_embd % max(self.n_head, 1) == 0,
             f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (self.activation in ("gelu", "relu"), f"activation must be 'gelu' or 'relu', got {self.activation!r}"),
            (self.positional in ("learned", "sinusoidal"),
             f"positional must be 'learned' or 'sinusoidal', got {self.positional!r}"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"model config: {message}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return from_known_keys(cls, d, "model config")

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"model config {path}: file does not exist") from None
        except json.JSONDecodeError as e:
            raise UserError(f"model config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        d.pop("_comment", None)
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return asdict(self)

    def decoder(self) -> DecoderConfig:
        """This GPT as the decoder's configuration."""
        return DecoderConfig(
            vocab_size=self.vocab_size, n_ctx=self.n_ctx, n_layer=self.n_layer, n_head=self.n_head,
            n_embd=self.n_embd, norm="layernorm", norm_eps=self.layer_norm_epsilon, norm_bias=self.bias,
            positional=self.positional, qkv_bias=self.bias, out_bias=self.bias, mlp_bias=self.bias,
            activation="gelu_tanh" if self.activation == "gelu" else "relu", tied=True, dropout=self.dropout)


class GPT(Decoder):
    """GPT-2's architecture as one configuration of the decoder: learned (or sinusoidal) positions,
    pre-LayerNorm blocks, multi-head attention, a GELU (or ReLU) MLP, the head tied to the embedding.
    `.config` is the GPTConfig (what training reads and writes); `.arch` the decoder's description."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.decoder())
        self.config = config
