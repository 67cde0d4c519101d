"""Choosing the next token from logits, for a whole batch at once in NumPy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError


@dataclass
class SamplingConfig:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the prompt or output (CTRL, HF)

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise UserError(f"--temperature {self.temperature}: expected a number >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: expected an integer >= 0 (0 means off)")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise UserError(f"--repetition-penalty {self.repetition_penalty}: expected a number > 0 (1 means off)")
        if self.seed is not None and self.seed < 0:
            raise UserError(f"--seed {self.seed}: expected an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_defaults(cls, defaults: dict, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, repetition_penalty: float | None = None,
                      seed: int | None = None) -> "SamplingConfig":
        """What the user gave, else generation_config.json's defaults, as transformers' generate() does:
        sampling when the file says do_sample (or the user asks for top-k/top-p), greedy otherwise;
        temperature 0 is always greedy."""
        sample = bool(defaults.get("do_sample")) or top_k is not None or top_p is not None
        if temperature is None:
            temperature = float(defaults.get("temperature", 1.0)) if sample else 0.0
        pick = lambda given, key, off: given if given is not None else (defaults.get(key, off) if sample else off)  # noqa: E731
        # as transformers (and transformers.js): the file's repetition penalty applies to greedy decoding too
        penalty = repetition_penalty if repetition_penalty is not None else defaults.get("repetition_penalty", 1.0)
        return cls(temperature=temperature, top_k=int(pick(top_k, "top_k", 0)), top_p=float(pick(top_p, "top_p", 1.0)),
                   repetition_penalty=float(penalty), seed=seed)


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """logits (B, V) float -> next ids (B,) int64. seen (B, V) bool: tokens so far, for the penalty."""
        c = self.config
        if c.repetition_penalty != 1.0 and seen is not None:
            # as transformers' RepetitionPenaltyLogitsProcessor: shrink positive logits, grow negative ones
            penalized = np.where(logits > 0, logits / c.repetition_penalty, logits * c.repetition_penalty)
            logits = np.where(seen, penalized, logits)
        if c.greedy:
            return logits.argmax(-1).astype(np.int64)
        # shift before dividing: a tiny temperature would turn logits / T into inf - inf = nan
        z = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # -> -inf: probability 0, as it should be
            z = (z - z.max(-1, keepdims=True)) / c.temperature
        if c.top_k and c.top_k < z.shape[-1]:
            kth = np.partition(z, -c.top_k, axis=-1)[:, -c.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        if c.top_p < 1.0:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < c.top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(-1, keepdims=True)
        u = self.rng.random((p.shape[0], 1))
        return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)


def sample_rows(logits: np.ndarray, samplers: list[Sampler]) -> np.ndarray:
    """logits (n, V) -> next ids (n,), row i chosen by samplers[i]: the id that sampler gives that row alone
    (the same float64 operations row by row, and each row draws from its own random stream), in a few NumPy
    calls per group of rows that share top-k and whether top-p is on. A continuous batch mixes requests
    with their own temperature, top_p and seed; one Sampler call per row costs ~40 us."""
    out = np.empty(len(samplers), dtype=np.int64)
    groups: dict = {}
    for i, s in enumerate(samplers):
        c = s.config
        key = "alone" if c.repetition_penalty != 1.0 else "greedy" if c.greedy else (c.top_k, c.top_p < 1.0)
        groups.setdefault(key, []).append(i)
    for key, rows in groups.items():
        if key == "alone":
            for i in rows:
                out[i] = samplers[i](logits[i:i + 1])[0]
            continue
        if key == "greedy":
            out[rows] = logits[rows].argmax(-1)
            continue
        top_k, nucleus = key
        temperature = np.array([[samplers[i].config.temperature] for i in rows])
        z = logits[rows].astype(np.float64)
        with np.errstate(over="ignore"):
            z = (z - z.max(-1, keepdims=True)) / temperature
        if top_k and top_k < z.shape[-1]:
            kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        z -= z.max(-1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(-1, keepdims=True)
        if nucleus:
            top_p = np.array([[samplers[i].config.top_p] for i in rows])
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            p = np.where(keep, p, 0.0)
            p /= p.sum(-1, keepdims=True)
        u = np.array([samplers[i].rng.random((1, 1))[0] for i in rows])  # (n, 1): as Sampler draws for one row
        out[rows] = np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)
    return out
