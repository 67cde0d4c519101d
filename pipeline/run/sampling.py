"""Choosing the next token from logits, for a whole batch at once in NumPy."""
from __future__ import annotations

import bisect
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
    """Draws the next id of each row: temperature, then top-k, then top-p (nucleus), as transformers orders
    them. Row by row, in float32 for the logits and float64 for the running mass: a row's id depends on
    that row's logits and random draw only, so a row sampled in a batch gets what it gets alone."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        # 1/T, once: a temperature so small that 1/T overflows float32 is greedy among the ties at the top
        # (0 * big = 0, the rest -> -inf); greedy (T = 0) never reaches pick
        self.inv_temperature = np.float32(min(1.0 / config.temperature, float(np.finfo(np.float32).max))
                                          if config.temperature else 1.0)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """logits (B, V) float -> next ids (B,) int64. seen (B, V) bool: tokens so far, for the penalty."""
        c = self.config
        logits = self.penalized(logits, seen)
        if c.greedy:
            return logits.argmax(-1).astype(np.int64)
        u = self.rng.random(logits.shape[0])  # one draw per row, in row order
        if self.whole_vocabulary(logits.shape[1]):
            return _pick_rows(logits, np.full(len(u), self.inv_temperature), u)
        return np.array([self.pick(row, x) for row, x in zip(logits, u)], dtype=np.int64)

    def penalized(self, logits: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
        c = self.config
        if c.repetition_penalty == 1.0 or seen is None:
            return logits
        # as transformers' RepetitionPenaltyLogitsProcessor: shrink positive logits, grow negative ones
        penalized = np.where(logits > 0, logits / c.repetition_penalty, logits * c.repetition_penalty)
        return np.where(seen, penalized, logits)

    def distribution(self, row: np.ndarray) -> np.ndarray:
        """The probabilities (V,) float64 that pick() samples one row of (penalized) logits from: temperature,
        top-k, top-p, as pick() applies them (speculative sampling needs p itself: run/speculative.py)."""
        c = self.config
        row = row.astype(np.float32, copy=False)
        top = row.max()
        out = np.zeros(row.shape[0], dtype=np.float64)
        ids = np.arange(row.shape[0])
        if c.top_k and c.top_k < row.shape[0]:
            ids = _top_k(row, c.top_k, scale=c.temperature, top=top)
        with np.errstate(over="ignore"):
            p = np.exp((row[ids] - top) * self.inv_temperature)
        if c.top_p < 1.0:
            keep = _nucleus(p, c.top_p)
            ids, p = ids[keep], p[keep]
        out[ids] = p
        return out / out.sum()

    def accepts(self, logits: np.ndarray, drafts: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
        """Speculative decoding's test of one draft id per row (B,) against logits (B, V): greedy keeps a draft
        that is the argmax; sampling keeps it with probability p(draft) (min(1, p/q) for a draft that is
        certain, q = 1), one draw per row in row order."""
        logits = self.penalized(logits, seen)
        if self.config.greedy:
            return logits.argmax(-1) == drafts
        u = self.rng.random(logits.shape[0])
        return np.array([x < self.distribution(row)[d] for row, d, x in zip(logits, drafts, u)])

    def residual(self, logits: np.ndarray, drafts: np.ndarray, seen: np.ndarray | None,
                 rows: np.ndarray) -> np.ndarray:
        """After a refused draft: the id drawn from max(0, p - q), i.e. p without the draft, renormalised
        (greedy: the argmax, which the draft was not), for the rows marked in `rows`; others get -1."""
        logits = self.penalized(logits, seen)
        if self.config.greedy:
            return np.where(rows, logits.argmax(-1), -1)
        out = np.full(logits.shape[0], -1, dtype=np.int64)
        for b in np.flatnonzero(rows):
            p = self.distribution(logits[b])
            p[drafts[b]] = 0.0
            out[b] = _inverse_cdf(p, self.rng.random())
        return out

    def whole_vocabulary(self, vocab: int) -> bool:
        """Sampling from every id at a temperature (no top-k, no top-p): what _pick_rows does for many rows."""
        c = self.config
        return not c.greedy and not (c.top_k and c.top_k < vocab) and c.top_p >= 1.0

    def pick(self, row: np.ndarray, u: float) -> int:
        """The id that the uniform draw u in [0, 1) selects from one row of logits (V,) (temperature > 0).

        Written for a 49k vocabulary at serving rates: the float64 version over the whole row, with a full
        sort for top-p, took ~0.6 ms a row (10 ms a step at 16 rows of SmolLM2); this one ~0.1 ms."""
        c = self.config
        row = row.astype(np.float32, copy=False)
        top = row.max()
        ids = None  # None: every id is a candidate
        if c.top_k and c.top_k < row.shape[0]:
            # the k largest logits are the k largest after temperature: find them on the raw row, then scale
            # only those (a step of the small preset: ~50 us a row before, over the whole row)
            ids = _top_k(row, c.top_k, scale=c.temperature, top=top)  # (not 1 / inv_temperature: that can be 0)
            row = row[ids]
        with np.errstate(over="ignore"):
            z = (row - top) * self.inv_temperature
        p = np.exp(z)  # the largest is exp(0) = 1: no overflow, and the sum is >= 1
        if ids is not None and len(ids) <= SMALL:
            return int(ids[_pick_few(p, c.top_p, u)])
        if c.top_p < 1.0:
            keep = _nucleus(p, c.top_p)
            ids = keep if ids is None else ids[keep]
            p = p[keep]
        i = _inverse_cdf(p, u)
        return int(i if ids is None else ids[i])


def _inverse_cdf(p: np.ndarray, u: float, block: int = 256) -> int:
    """The first index whose running mass (float64) passes u of the total; an index of probability 0 is
    never chosen. In two levels, sums of blocks and then one block, because NumPy's cumsum over a 49k row
    takes ~0.5 ms and this ~30 us."""
    if p.shape[0] <= block:  # one level (top-k or top-p candidates): the running mass itself
        mass = np.cumsum(p, dtype=np.float64)
        i = int(np.searchsorted(mass, u * mass[-1], side="right"))
        return i if i < len(p) else int(np.flatnonzero(p)[-1])
    sums = np.add.reduceat(p, np.arange(0, p.shape[0], block), dtype=np.float64)
    mass = np.cumsum(sums)
    x = u * mass[-1]
    return _within_block(p, sums, mass, x, int(np.searchsorted(mass, x, side="right")), block)


def _within_block(p: np.ndarray, sums: np.ndarray, mass: np.ndarray, x: float, j: int, block: int) -> int:
    """_inverse_cdf's second level: the id inside block j (the first block whose running mass passes x)."""
    if j == len(mass):  # x rounded up to the total: the last block with any mass
        j = int(np.flatnonzero(sums)[-1])
    part = p[j * block:(j + 1) * block]
    inner = np.cumsum(part, dtype=np.float64) + (mass[j - 1] if j else 0.0)
    i = int(np.searchsorted(inner, x, side="right"))
    if i == len(part):  # the two sums rounded differently: the block's last id with any mass
        i = int(np.flatnonzero(part)[-1])
    return j * block + i


def _pick_rows(logits: np.ndarray, inv_temperature: np.ndarray, u: np.ndarray, block: int = 256) -> np.ndarray:
    """pick() for n rows at once, each sampling every id at its own temperature: the same float32 and
    float64 operations as pick() and _inverse_cdf() on each row, done for all rows in one call each (the
    server's step at 16 rows of the small preset: sampling took 16% of the engine thread row by row). NumPy
    reduces each row of a 2-D array as it reduces that row alone, so every row gets the id pick() gives it
    alone (tests/run/test_sampling.py checks it id for id)."""
    rows = logits.astype(np.float32, copy=False)
    p = rows - rows.max(axis=1, keepdims=True)  # the one (n, V) temporary: at 16 x 49k a fresh one per
    with np.errstate(over="ignore"):              # operation costs page faults
        p *= inv_temperature.astype(np.float32)[:, None]
    np.exp(p, out=p)
    if p.shape[1] <= block:
        mass = np.cumsum(p, axis=1, dtype=np.float64)
        x = u * mass[:, -1]
        ids = (mass <= x[:, None]).sum(axis=1)  # searchsorted(side="right") of each row
        return np.array([i if i < p.shape[1] else int(np.flatnonzero(p[r])[-1]) for r, i in enumerate(ids)],
                        dtype=np.int64)
    sums = np.add.reduceat(p, np.arange(0, p.shape[1], block), axis=1, dtype=np.float64)
    mass = np.cumsum(sums, axis=1)
    x = u * mass[:, -1]
    j = (mass <= x[:, None]).sum(axis=1)
    return np.array([_within_block(p[r], sums[r], mass[r], x[r], int(j[r]), block) for r in range(len(p))],
                    dtype=np.int64)


SMALL = 256  # candidates (a top-k's) few enough for _pick_few


def _pick_few(p: np.ndarray, top_p: float, u: float) -> int:
    """_nucleus then _inverse_cdf over a few candidates, in Python floats: the same float64 operations in the
    same order (NumPy's cumsum adds in sequence; the nucleus's total is NumPy's own sum), so the same index,
    without their dozen NumPy calls: inside the generation loop those cost ~0.1 ms a token on the small
    preset, more than the arithmetic on 50 numbers (tests/run/test_sampling.py checks the two agree)."""
    pl = p.tolist()  # float32 -> float64, exactly
    kept = range(len(pl))
    if top_p < 1.0:
        target = top_p * float(p.sum(dtype=np.float64))
        order = sorted(kept, key=pl.__getitem__, reverse=True)  # largest first; stable, so ties by index
        cum, keep = 0.0, []
        for j in order:
            cum += pl[j]
            if cum - pl[j] < target:  # the mass before j, as _nucleus computes it
                keep.append(j)
        kept = sorted(keep)
    masses, cum = [], 0.0
    for j in kept:
        cum += pl[j]
        masses.append(cum)
    x = u * cum
    i = bisect.bisect_right(masses, x)
    if i == len(masses):  # x rounded up to the total: the last candidate with any mass
        i = max(n for n, j in enumerate(kept) if pl[j] > 0)
    return kept[i]


def _top_k(x: np.ndarray, k: int, scale: float = 1.0, top: float | None = None) -> np.ndarray:
    """Indices (ascending) of the k largest x, ties with the k-th included (as transformers' TopKLogitsWarper).
    Partitions only the ids near the top (within margin * scale of the largest: scale is the temperature when
    x is a raw row) when k of them are there: a partition of a 49k row takes ~0.4 ms, of 8k ~45 us."""
    top = x.max() if top is None else top
    for margin in (8.0, 12.0, 16.0, 32.0, np.inf):
        near = np.flatnonzero(x >= top - margin * scale)
        if len(near) >= k:
            kth = np.partition(x[near], -k)[-k]
            return near[x[near] >= kth]  # every id >= the k-th is in `near`: the k-th is the row's own
    raise AssertionError("unreachable: the last margin takes every id")


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices (ascending) of the smallest set of largest p (largest first, ties by id) whose mass reaches
    top_p of the total; the largest always stays. Only ids above a floor are sorted, once they hold that
    mass: every id below it comes after all of them, so the cut falls among them (a full sort of a 49k
    row takes ~2.4 ms)."""
    target = top_p * p.sum(dtype=np.float64)
    order = None
    for floor in (1e-2, 1e-4, 1e-6) if len(p) > 256 else ():  # p <= 1 (the largest is 1)
        cand = np.flatnonzero(p > floor)
        if p[cand].sum(dtype=np.float64) >= target:
            order = cand[np.argsort(-p[cand], kind="stable")]  # stable: ties by id
            break
    if order is None:  # every id (a few: the top-k's candidates)
        order = np.argsort(-p, kind="stable")
    sp = p[order].astype(np.float64)
    return np.sort(order[np.cumsum(sp) - sp < target])


def sample_rows(logits: np.ndarray, samplers: list[Sampler]) -> np.ndarray:
    """logits (n, V) -> next ids (n,), row i chosen by samplers[i] with its own draw: the id that sampler
    gives that row alone. A continuous batch mixes requests with their own temperature, top_p and seed."""
    out = np.empty(len(samplers), dtype=np.int64)
    whole, rest = [], []
    for i, s in enumerate(samplers):
        (whole if s.whole_vocabulary(logits.shape[1]) else rest).append(i)
    if whole:  # one draw each from its own generator, as s(logits[i:i + 1]) would take it
        u = np.array([samplers[i].rng.random(1)[0] for i in whole])
        rows = logits if not rest else logits[whole]
        out[whole] = _pick_rows(rows, np.array([samplers[i].inv_temperature for i in whole]), u)
    for i in rest:
        out[i] = samplers[i](logits[i:i + 1])[0]
    return out
