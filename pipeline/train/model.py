"""A GPT decoder, read top-down: config, attention, MLP, block, model.

Parameter names follow Hugging Face's GPT-2 (wte, wpe, h.N.attn.c_attn, ...) so a checkpoint
converts to a GPT2LMHeadModel by transposing the Linear weights (GPT-2 stores Conv1D as (in, out)).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import UserError


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


def sinusoidal_table(n_ctx: int, n_embd: int) -> torch.Tensor:
    """(n_ctx, n_embd) fixed position encodings of 'Attention Is All You Need', sin/cos interleaved."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_ctx, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : n_embd // 2]
    return table.float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, bias=None, past=None):
        # x: (B, T, C); bias: additive mask (B, 1, T, P+T) or None for plain causal;
        # past: (key, value) each (B, H, P, D) or None
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, D)
            v = torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh") if config.activation == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, bias=None, past=None):
        a, present = self.attn(self.ln_1(x), bias, past)
        x = x + self.resid_dropout(a)
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_ctx, config.n_embd)
        if config.positional == "sinusoidal":
            self.wpe.weight.data.copy_(sinusoidal_table(config.n_ctx, config.n_embd))
            self.wpe.weight.requires_grad_(False)  # fixed, not learned
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, targets=None):
        """Training forward: input_ids (B, T) -> logits (B, T, V), and the mean cross-entropy if targets."""
        B, T = input_ids.shape
        assert T <= self.config.n_ctx, f"sequence {T} longer than context {self.config.n_ctx}"
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        for block in self.h:
            x, _ = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def forward_with_cache(self, input_ids, attention_mask, position_ids, past_key_values):
        """The ONNX graph contract (see shared/DESIGN.md).

        input_ids, position_ids: (B, T) int64; attention_mask: (B, P+T) int64, 0 at padding;
        past_key_values: one (key, value) pair per layer, each (B, H, P, D), P may be 0.
        Returns logits (B, T, V) and the presents, each (B, H, P+T, D).
        """
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2]
        # Query i sits at absolute slot P+i and sees key slots j <= P+i that are not padding.
        # A large finite negative rather than -inf: a padding query row, all masked, stays finite.
        q_slot = torch.arange(T, device=input_ids.device)[:, None] + P
        k_slot = torch.arange(P + T, device=input_ids.device)[None, :]
        causal = (k_slot <= q_slot)[None, None, :, :]                        # (1, 1, T, P+T)
        visible = causal & attention_mask[:, None, None, :].bool()           # (B, 1, T, P+T)
        bias = torch.zeros(visible.shape, dtype=self.wte.weight.dtype, device=input_ids.device)
        bias = bias.masked_fill(~visible, torch.finfo(bias.dtype).min)
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for block, past in zip(self.h, past_key_values):
            x, present = block(x, bias, past)
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))
        return logits, presents

    def empty_cache(self, batch_size: int, dtype=torch.float32):
        c = self.config
        shape = (batch_size, c.n_head, 0, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(c.n_layer)]
