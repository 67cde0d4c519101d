"""Parity: each ONNX graph of an export (every variant, and each fused twin) against the PyTorch fp32
model it came from, on the same held-out token windows.

The pattern of minGPT's Hugging Face test, made numeric: logits close, the same greedy tokens. The
metrics are llama.cpp's (`llama-perplexity --kl-divergence`), per scored position (a position whose
next token is known):
    kl_mean, kl_p99      KL(PyTorch || graph) of the next-token distribution
    top1                 same top-1 token, with its 95% Wilson lower bound (the verdict uses the bound)
    ppl_ratio            perplexity of the windows' next tokens, graph over PyTorch
    rms_dp               RMS of the change in probability of the true next token
    max_abs, p99_abs     |Δlogit| (p99 over a fixed-stride sample of every logit)
    tol_ratio            max of |Δ| / (atol + rtol·max|ref| of its row): the bound of fp32/fp16, ≤ 1 passes
    cache, padded        structural checks (plain graphs): the windows fed in two steps (past > 0), and a
                         left-padded batch of 4 rows against each row run alone; as tol_ratio
    greedy_match         greedy tokens before the first disagreement (of `greedy_tokens`)

Memory: the windows stream, and one graph is open at a time. The reference runs once per call of a few
windows (CHUNK, fewer for a wide vocabulary: LOGITS_BUDGET) and its fp32 logits go to a temporary file on
disk (n x T x V x 4 bytes: 1.7 GB for SmolLM2's 49k vocabulary, 8.8 GB for Gemma 3's 262k), never to memory
whole, and the reference's model is released (`release`). Then each graph is opened alone (its ONNX Runtime
session is the largest thing parity holds: no pre-packed second copy of float weights, and for a plain graph
no CPU arena that would keep a call's logits), run over the windows call by call against the reference's
logits read back from the file, and closed, its memory handed back (exports.release_memory), before the next
opens. The scores are running sums (the KL per position, a fixed-stride sample of |Δlogit| for the p99), so
parity holds at most a call's logits, whatever the number of windows, the number of graphs or the vocabulary.
Measured on SmolLM2 (four variants and four twins): 7.81 GB at the peak with every session open at once; the
figure now is in benchmarks/MEMORY.md.

How a graph is run: a plain graph takes each window whole (past 0). A fused twin is run as `onnxgen run`
runs it, through its shared KV buffer. Row b prefills its first 1 + b % 8 tokens. In the first call (a
right-padded batch) each row is then teacher-forced one token per step, so the padded prefill and the batched
decode step are scored. In later calls each row goes alone: DECODE_STEPS single steps, then the rest of the
window in one call that returns every position's logits (the twin's logits_to_keep input, what speculation's
check and a chat's next turn use): one pass a window where one step a token made a wide vocabulary's head
the whole cost (Gemma 3: 8,437 passes through its 262k head per twin). The same positions are scored either
way. A twin with state (LFM2, Granite 4) or from before logits_to_keep is teacher-forced throughout.

Enough tokens that one token cannot flip a verdict: by default at least MIN_SCORED positions per graph
over at least MIN_WINDOWS windows; the report says how many each figure stands on.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline import manifest
from pipeline.check.sources import Source, open_source
from pipeline.errors import UserError
from pipeline.exports import atomic_write, fused_path, present_variants, read_config, release_memory, variant_path
from pipeline.run.lm import OnnxLM

log = logging.getLogger(__name__)

MIN_SCORED = 8192        # scored positions per graph, at least
MIN_WINDOWS = 32
WINDOW_LENGTH = 144      # tokens per window (shorter when the context is)
PREFILL_SPREAD = 8       # fused twins: row b prefills 1 + b % PREFILL_SPREAD tokens
DECODE_STEPS = 8         # fused twins after the first call: single steps before the rest of a window in one call
CHUNK = 8                # windows per forward call, at most (SmolLM2's 49k vocabulary: 28 MB of logits a window)
LOGITS_BUDGET = 256 << 20  # bytes of one graph's fp32 logits per forward call: fewer windows a call for a wider
                         # vocabulary (Gemma 3's 262k: 151 MB a window, so one), never the whole run's logits
PADDED_LOGITS = 256 << 20  # bytes of the padded check's batch logits (4 rows): shorter rows for a wide vocabulary
BLOCK_BYTES = 32 << 20   # the float64 maths of scoring runs over blocks of positions of about this size
CACHE_WINDOWS = CHUNK    # plain graphs: the two-step (past > 0) check runs on the first windows
GREEDY_TOKENS = 64
P99_SAMPLES = 1 << 20    # |Δlogit| values kept for the p99, spread evenly over every chunk
Z95 = 1.959964           # two-sided 95%


def window_plan(n_ctx: int, min_scored: int = MIN_SCORED, length: int = WINDOW_LENGTH) -> tuple[int, int]:
    """(windows, tokens per window) so that even a fused twin (which scores T - prefill positions of a
    window, prefill up to PREFILL_SPREAD) stands on at least `min_scored` positions."""
    T = min(length, n_ctx - 1)  # room for one step past the window (the padded check's extra step)
    per_window = T - (PREFILL_SPREAD + 1) / 2
    return max(MIN_WINDOWS, math.ceil(min_scored / per_window)), T


# ----------------------------------------------------------------------------- thresholds

@dataclass
class Thresholds:
    # |Δlogit| ≤ atol + rtol·(the largest |logit| of its row). Why relative: float32 rounding grows with the
    # size of what is summed and with depth, and it enters every logit of a position through the same
    # hidden state, so it scales with the row's logits, not with each logit's own size. Measured, correct
    # graphs: the trained small (4 layers, |logit| ≤ ~15) max |Δ| 3.4e-5 over 8,437 tokens; SmolLM2-135M
    # (30 layers, |logit| up to ~30) 1.05e-4 on 1k tokens and 1.49e-4 on 9k tokens, at a logit near 0 of a
    # row whose largest is ~20: an absolute 1e-4, or one relative to the logit itself, refuses it.
    # 1e-4 + 1e-5·max|ref| allows 3e-4 to 4e-4 on such rows (2x what SmolLM2 needs) and still sits three
    # orders of magnitude under the errors real bugs make (positions off by one, a wrong RoPE base, a
    # missing mask row, swapped k/v: ≥ 1e-1 each, tests/check/test_parity.py).
    atol: float | None = None
    rtol: float = 0.0
    structural: bool = False            # cache and padded checks under the same elementwise bound
    top1: float | None = None           # the 95% lower bound of same-top-1 must reach this, 0..1
    kl_mean: float | None = None        # maximum mean KL(PyTorch || graph), nats
    ppl_change_pct: float | None = None  # maximum |ppl ratio - 1| in percent
    greedy_identical: bool = False

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"|Δ| ≤ {self.atol:g}" + (f" + {self.rtol:g}·max|ref|" if self.rtol else ""))
        if self.structural:
            parts.append("cache/padded likewise")
        if self.top1 is not None:
            parts.append(f"top-1 ≥ {self.top1:.1%} (95% lower bound)")
        if self.kl_mean is not None:
            parts.append(f"KL ≤ {self.kl_mean:g}")
        if self.ppl_change_pct is not None:
            parts.append(f"|Δppl| ≤ {self.ppl_change_pct:g}%")
        if self.greedy_identical:
            parts.append("greedy identical")
        return ", ".join(parts)


# Per variant, for models trained here; a fused twin is held to its variant's. fp16's bound is on
# logits only (its past/present are fp16 by design), and relative as fp32's is: half precision keeps 11
# bits, so a hidden state that makes logits of 15 is stored to ~1e-3 of that and every layer adds such
# roundings. The old absolute 1e-2
# was set on 1,016 tokens; a maximum grows with the sample: on the trained small over 8,437 tokens the
# plain fp16 graph is 8.4e-3 off and its fused twin 1.1e-2 (KL 7e-8, same top-1 99.99%). 1e-2 + 1e-3·|ref|
# (about 2 ulp of the logit) admits that and still stands an order of magnitude under a real bug (≥ 0.1).
#
# int8's top-1 bar was 99% (issue 3, on 1,016 tokens). On 8,437 tokens it is a coin flip: the trained small
# measured 99.30% (lower bound 99.10%) in one run and 99.21% (99.00%) in a fresh clone, failing; an
# independent check on other text gave 98.8%. Every one of the 59 flipped tokens of the first run sits
# where PyTorch's top two tokens are within 0.02 of each other in probability (16.6% of positions are
# such near-ties; where the gap is wider, int8 agrees 100%): the bar measured near-ties, not int8. So:
# top-1 ≥ 98.5% (0.5 point under the measured lower bounds), and a bound that does measure the variant,
# mean KL ≤ 1e-3 (measured 6.4e-5; llama.cpp's Q8_0 of SmolLM2-135M is 5.5e-3). int4 likewise gets
# KL ≤ 5e-3 (measured 2.3e-4) beside its top-1 (98.66%, lower bound 98.39%, against 97%).
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(atol=1e-4, rtol=1e-5, structural=True, greedy_identical=True),
    "int8": Thresholds(top1=0.985, kl_mean=1e-3, ppl_change_pct=0.5),
    "int4": Thresholds(top1=0.97, kl_mean=5e-3, ppl_change_pct=1.5),
    "fp16": Thresholds(atol=1e-2, rtol=1e-3),
}
# Imports (export --hf / --gguf): the per-variant bars above were set on models trained here, which lose
# almost nothing to 8 and 4 bits; a real small model loses far more, and how much is a property of the
# model, not a defect of the export (SmolLM2-135M, 8,238 tokens: our int4 same top-1 77%, KL 0.24;
# llama.cpp's Q4_0 68%, KL 0.35; onnxruntime-genai's int4 63%, KL 0.44, issue 13's table). So an import's
# quantized variants are reported in full and fail only when the graph is broken: a wrong scale, a
# transposed or misplaced weight, a broken fused twin leave the next token to chance (same top-1 of a few
# percent, KL of several nats), far under these floors, while every real 4-bit format above clears them.
# fp32 keeps its bound: it does measure the graph.
IMPORT_FLOOR = Thresholds(top1=0.5, kl_mean=1.0)
# An import's fp16 is held to fp32 quality by the distribution, not by fp16's elementwise bound, which was
# set on the trained small (4 layers, hidden states of ordinary size). A real model's residual stream
# carries a few huge activations (SmolLM2-135M's reach 25,800 from layer 12 on, where one fp16 step is 16),
# so the absolute error that reaches a logit is a property of the model, not of the graph. SmolLM2-135M,
# 8,437 tokens, CPU: plain fp16 max |Δ| 0.107 (3.2x the bound), mean KL 4.9e-6, same top-1 99.81% (95% lower
# bound 99.69%); fused twin 0.238 (7.7x), KL 1.4e-5, top-1 99.59% (99.42%). CUDA (H200): plain 0.415 (13x),
# KL 3.1e-5, top-1 99.79% (99.66%); fused KL 1.9e-5, 99.73% (99.60%). So: mean KL ≤ 3e-4 (10x the worst of
# those, 10x under int8's 3e-3 on the same model) and same top-1 ≥ 99% (95% lower bound).
IMPORT_FP16 = Thresholds(top1=0.99, kl_mean=3e-4)


def thresholds_for(folder: Path) -> dict[str, Thresholds]:
    """The bars an export is held to: THRESHOLDS for models trained here; for an import, IMPORT_FLOOR for its
    quantized variants and IMPORT_FP16 for fp16."""
    if manifest.is_import(folder):
        return {**THRESHOLDS, "int8": IMPORT_FLOOR, "int4": IMPORT_FLOOR, "fp16": IMPORT_FP16}
    return THRESHOLDS


def wilson_lower(hits: int, n: int, z: float = Z95) -> float:
    """Lower end of the Wilson score interval for a proportion: what the data support at 95%."""
    if n == 0:
        return float("nan")
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


# ----------------------------------------------------------------------------- results

@dataclass
class VariantResult:
    variant: str                 # "int4", or "int4 fused" for a twin
    scored: int = 0              # positions every distribution figure stands on
    kl_mean: float = math.nan
    kl_p99: float = math.nan
    top1: float = math.nan
    top1_low: float = math.nan
    ppl: float = math.nan
    ppl_reference: float = math.nan
    ppl_ratio: float = math.nan
    rms_dp: float = math.nan
    max_abs: float = math.nan
    p99_abs: float = math.nan
    tol_ratio: float = math.nan
    cache_max_abs: float = math.nan
    padded_max_abs: float = math.nan
    cache_ratio: float = math.nan
    padded_ratio: float = math.nan
    greedy_match: int = 0
    greedy_tokens: int = 0
    thresholds: str = ""
    failures: list[str] = field(default_factory=list)
    status: str = "pass"         # "pass", "fail" or "not run"
    note: str = ""
    bytes: int = 0               # the graph's file size
    device: str = "cpu"

    @property
    def ppl_change_pct(self) -> float:
        return 100.0 * (self.ppl_ratio - 1.0)

    def check(self, t: Thresholds) -> "VariantResult":
        self.thresholds = t.describe()
        f = []
        if t.atol is not None and not self.tol_ratio <= 1.0:
            f.append(f"max |Δlogit| {self.max_abs:.3g} beyond {t.atol:g} + {t.rtol:g}·max|ref| "
                     f"({self.tol_ratio:.3g}x the bound)")
        if t.structural:
            for name in ("cache", "padded"):
                ratio = getattr(self, f"{name}_ratio")
                if not math.isnan(ratio) and not ratio <= 1.0:
                    f.append(f"{name} max |Δlogit| {getattr(self, f'{name}_max_abs'):.3g} beyond the bound "
                             f"({ratio:.3g}x)")
        if t.top1 is not None and not self.top1_low >= t.top1:
            f.append(f"top-1 agreement {self.top1:.2%} (95% lower bound {self.top1_low:.2%} over {self.scored} "
                     f"tokens) < {t.top1:.1%}")
        if t.kl_mean is not None and not self.kl_mean <= t.kl_mean:
            f.append(f"mean KL {self.kl_mean:.3g} > {t.kl_mean:g}")
        if t.ppl_change_pct is not None and not abs(self.ppl_change_pct) <= t.ppl_change_pct:
            f.append(f"perplexity change {self.ppl_change_pct:+.3f}% beyond ±{t.ppl_change_pct:g}%")
        if t.greedy_identical and self.greedy_match < self.greedy_tokens:
            f.append(f"greedy generation differs at token {self.greedy_match + 1} of {self.greedy_tokens}")
        self.failures = f
        self.status = "fail" if f else "pass"
        return self


@dataclass
class ParityReport:
    windows: int
    window_length: int
    source: str
    results: list[VariantResult]

    @property
    def passed(self) -> bool:
        return all(r.status != "fail" for r in self.results)

    def result(self, variant: str) -> VariantResult:
        return next(r for r in self.results if r.variant == variant)

    def to_dict(self) -> dict:
        def clean(d):  # NaN (a figure not measured) is not JSON
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
        return {"windows": self.windows, "window_length": self.window_length, "source": self.source,
                "passed": self.passed,
                "variants": {r.variant: clean({**asdict(r), "ppl_change_pct": r.ppl_change_pct}) for r in self.results}}

    def table(self) -> str:
        """The short table `make export` ends with."""
        lines = ["| graph | size | KL mean | same top-1 | PPL ratio | status |", "| --- | --- | --- | --- | --- | --- |"]
        for r in self.results:
            size = f"{r.bytes / 1e6:.1f} MB" if r.bytes else ""
            if r.status == "not run":
                lines.append(f"| {r.variant} | {size} | | | | not run |")
                continue
            lines.append(f"| {r.variant} | {size} | {r.kl_mean:.2e} | {r.top1:.2%} | {r.ppl_ratio:.4f} | {r.status} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [
            "# Parity report",
            "",
            f"Each graph against the PyTorch fp32 model ({self.source}) on {self.windows} held-out windows of "
            f"{self.window_length} tokens; `tokens` is how many scored positions (next token known) each figure "
            "stands on. KL is KL(PyTorch ‖ graph) per position; top-1 shows the 95% lower bound the verdict uses; "
            "RMS Δp is the RMS change in the probability of the true next token. `cache` feeds the windows in two "
            "steps (past > 0), `padded` is a left-padded batch of 4 rows against each row alone (plain graphs); a "
            "fused twin is prefilled and teacher-forced through its shared KV buffer as `onnxgen run` runs it. "
            "Greedy counts the tokens generated before the first disagreement.",
            "",
            "| graph | size | status | tokens | KL mean | KL p99 | same top-1 (low) | PPL ratio | RMS Δp | max \\|Δ\\| "
            "| p99 \\|Δ\\| | cache Δ | padded Δ | greedy | thresholds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.results:
            size = f"{r.bytes / 1e6:.2f} MB" if r.bytes else ""
            if r.status == "not run":
                lines.append(f"| {r.variant} | {size} | not run |" + " |" * 11 + f" {r.thresholds}; {r.note} |")
                continue
            opt = lambda x: "" if math.isnan(x) else f"{x:.2e}"  # noqa: E731
            lines.append(
                f"| {r.variant}{' (cuda)' if r.device == 'cuda' else ''} | {size} | {r.status} | {r.scored} | "
                f"{r.kl_mean:.2e} | {r.kl_p99:.2e} | {r.top1:.2%} ({r.top1_low:.2%}) | {r.ppl_ratio:.4f} | "
                f"{100 * r.rms_dp:.3f}% | {r.max_abs:.2e} | {r.p99_abs:.2e} | {opt(r.cache_max_abs)} | "
                f"{opt(r.padded_max_abs)} | {r.greedy_match}/{r.greedy_tokens} | {r.thresholds} |")
        failures = [f"- {r.variant}: {f}" for r in self.results for f in r.failures]
        if failures:
            lines += ["", "## Failures", "", *failures]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[str]:
        """parity.json, parity.md and parity.png (the chart) in folder; returns their names."""
        atomic_write(folder / "parity.json", json.dumps(self.to_dict(), indent=2) + "\n")
        atomic_write(folder / "parity.md", self.markdown())
        self.chart(folder / "parity.png")
        return ["parity.json", "parity.md", "parity.png"]

    def chart(self, path: Path) -> None:
        """One bar chart per metric, a bar per graph, its threshold as a dashed line."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.results if r.status != "not run"]
        names = [r.variant.replace(" fused", "\nfused") for r in rows]
        colors = ["tab:green" if r.status == "pass" else "tab:red" for r in rows]
        panels = [("KL mean (log)", lambda r: r.kl_mean, lambda t: t.kl_mean, True),
                  ("same top-1 %", lambda r: 100 * r.top1, lambda t: None if t.top1 is None else 100 * t.top1, False),
                  ("|PPL ratio - 1| % (log)", lambda r: abs(r.ppl_change_pct), lambda t: t.ppl_change_pct, True),
                  ("max |Δlogit| (log)", lambda r: r.max_abs, None, True),
                  ("size MB", lambda r: r.bytes / 1e6, None, False)]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6))
        for ax, (title, value, limit, log_scale) in zip(axes, panels):
            values = [value(r) for r in rows]
            ax.bar(range(len(rows)), [max(v, 1e-12) if log_scale else v for v in values], color=colors)
            ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=45, ha="right")
            if log_scale:
                ax.set_yscale("log")
            for x, r in enumerate(rows):
                t = limit(THRESHOLDS.get(r.variant.split()[0], Thresholds())) if limit else None
                if t is not None:
                    ax.hlines(t, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
            if title.startswith("same top-1"):  # zoom in: the interesting range is the last few percent
                ax.set_ylim(min([*values, 96.0]) - 1.0, 100.2)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="y", labelsize=8)
        fig.suptitle(f"parity against PyTorch fp32 ({self.windows}×{self.window_length} held-out tokens); "
                     "dashed: threshold, red: missed", fontsize=9)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)


# ----------------------------------------------------------------------------- running the graphs

def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Reference:
    """The PyTorch model through the same contract as a plain graph (NumPy in, NumPy out)."""

    def __init__(self, source: Source):
        self.source = source

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return self.source.empty_past(batch)

    @torch.no_grad()
    def forward(self, ids, mask, pos, past):
        logits, presents = self.source.reference(torch.from_numpy(ids), torch.from_numpy(mask),
                                                 torch.from_numpy(pos), [torch.from_numpy(p) for p in past])
        return logits.float().numpy(), [p.numpy() for p in presents]


def _full(model, windows: np.ndarray) -> np.ndarray:
    """(n, T, V) logits of whole windows, past 0."""
    mask = np.ones_like(windows)
    return model.forward(windows, mask, _positions(mask), model.empty_past(len(windows)))[0]


def prefill_lengths(n: int) -> np.ndarray:
    return 1 + np.arange(n) % PREFILL_SPREAD


def _teacher_forced(lm: OnnxLM, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fused twin's (n, T, V) logits and (n, T) scored mask: row b prefills its first p_b tokens, then is
    fed the window's next token each step; position t's logits are scored once the graph has produced them."""
    n, T = windows.shape
    p = prefill_lengths(n)
    out = np.zeros((n, T, lm.vocab_size), np.float32)
    valid = np.zeros((n, T), bool)
    state = lm.start([list(w[:k]) for w, k in zip(windows, p)], budget=T - int(p.min()))
    rows = np.arange(n)
    out[rows, p - 1], valid[rows, p - 1] = state.logits, True
    for s in range(T - int(p.min()) - 1):
        t = p + s                      # the position each row feeds now
        live = t < T - 1               # a row whose window is used up feeds a pad and stays put
        nxt = np.where(live, windows[rows, np.minimum(t, T - 1)], lm.pad_id)
        logits = state.step(nxt, ~live)
        out[rows[live], t[live]], valid[rows[live], t[live]] = logits[live], True
    return out, valid


def _extended(lm: OnnxLM, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """As _teacher_forced, the same positions scored, each row alone: prefill its first p_b tokens, DECODE_STEPS
    single steps, then the rest of the window in one call with every position's logits (SharedBufferDecode.
    extend; GroupQueryAttention takes several new tokens after a past for one row only)."""
    n, T = windows.shape
    p = prefill_lengths(n)
    out = np.zeros((n, T, lm.vocab_size), np.float32)
    valid = np.zeros((n, T), bool)
    for b, k in enumerate(p.tolist()):
        state = lm.start([list(windows[b, :k])], budget=T - k)
        out[b, k - 1] = state.logits[0]
        rest = min(k + DECODE_STEPS, T - 1)  # the first position fed in one call
        for t in range(k, rest):
            out[b, t] = state.step(windows[b, t:t + 1], np.zeros(1, bool))[0]
        if rest < T - 1:
            out[b, rest:T - 1] = state.extend(windows[b:b + 1, rest:T - 1])[0]
        valid[b, k - 1:T - 1] = True
    return out, valid


def _bound(ref: np.ndarray, t: Thresholds) -> np.ndarray:
    """Each logit's allowed |Δ|: atol + rtol·(the largest |logit| of its row), see Thresholds."""
    return t.atol + t.rtol * np.abs(ref).max(-1, keepdims=True)


def _tol_ratio(ref: np.ndarray, got: np.ndarray, t: Thresholds) -> float:
    """The largest |Δ| / bound over (..., V) logits, in float64 over blocks of positions (BLOCK_BYTES): a
    whole call's float64 copies were 1.2 GB of Gemma 3's export peak (262k vocabulary)."""
    if t.atol is None:
        return math.nan
    V = ref.shape[-1]
    ref, got = ref.reshape(-1, V), got.reshape(-1, V)
    block = max(1, BLOCK_BYTES // (8 * V))
    return max(float((np.abs(got[i:i + block].astype(np.float64) - r) / _bound(r, t)).max())
               for i in range(0, len(ref), block) for r in (ref[i:i + block],))


def _padded_vs_alone(lm: OnnxLM, windows: np.ndarray, pad_id: int, t: Thresholds) -> tuple[float, float]:
    """Left-pad 4 rows of different lengths; each row's logits must equal that row run alone, at the
    prompt and at one further step with past > 0. Returns (max |Δ|, tolerance ratio). The batch's logits stay
    within PADDED_LOGITS: a wide vocabulary pads shorter rows (Gemma 3's 262k: 64 tokens; 144 up to 116k)."""
    L = min(windows.shape[1], max(8, PADDED_LOGITS // (4 * 4 * lm.vocab_size)))
    lengths = [L, (3 * L) // 4, L // 2, max(2, L // 4)]
    rows = [windows[i % len(windows), :n] for i, n in enumerate(lengths)]
    ids = np.full((4, L), pad_id, dtype=np.int64)
    mask = np.zeros((4, L), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    pos = _positions(mask)
    batch_logits, past = lm.forward(ids, mask, pos, lm.empty_past(4))
    nxt = batch_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask2 = np.concatenate([mask, np.ones((4, 1), np.int64)], 1)
    step_logits, _ = lm.forward(nxt, mask2, pos[:, -1:] + 1, past)
    worst, ratio = 0.0, 0.0
    for b, r in enumerate(rows):
        r = r[None]
        alone, alone_past = lm.forward(r, np.ones_like(r), _positions(np.ones_like(r)), lm.empty_past(1))
        m = np.ones((1, r.shape[1] + 1), np.int64)
        alone_step, _ = lm.forward(nxt[b:b + 1], m, np.array([[r.shape[1]]]), alone_past)
        for got, want in ((batch_logits[b, L - r.shape[1]:], alone[0]), (step_logits[b], alone_step[0])):
            worst = max(worst, float(np.abs(got - want).max()))
            ratio = max(ratio, _tol_ratio(want, got, t)) if t.atol is not None else math.nan
    return worst, ratio


def _greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    """Greedy tokens through the plain contract (the reference, or a plain graph)."""
    ids = prompt[None].astype(np.int64)
    mask = np.ones_like(ids)
    pos = _positions(mask)
    past = model.empty_past(1)
    out = []
    for _ in range(n):
        logits, past = model.forward(ids, mask, pos, past)
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids = np.array([[token]], dtype=np.int64)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
    return out


def _greedy_fused(lm: OnnxLM, prompt: np.ndarray, n: int) -> list[int]:
    """Greedy tokens the way `onnxgen run` makes them with the fused twin."""
    # the graph's own steps, one token a call: speculation is judged apart (tests/run/test_speculative.py)
    return [int(t[0]) for t in lm.generate([list(prompt)], n, stop_at_eos=False, speculate=False)]


# ----------------------------------------------------------------------------- scoring

class _Score:
    """Running sums of one graph's figures over the chunks of windows."""

    def __init__(self, t: Thresholds, stride: int):
        self.t, self.stride = t, stride
        self.n = self.top1 = 0
        self.kl: list[np.ndarray] = []
        self.nll_ref = self.nll_got = self.dp2 = 0.0
        self.max_abs, self.tol_ratio = 0.0, 0.0 if t.atol is not None else math.nan
        self.sample: list[np.ndarray] = []

    def add(self, ref: np.ndarray, got: np.ndarray, targets: np.ndarray, scored: np.ndarray) -> None:
        """ref, got (n, T, V) logits of one call; targets (n, T) next tokens; scored (n, T) positions to count.
        The float64 maths runs over blocks of positions (BLOCK_BYTES), so its temporaries stay small; the
        p99 sample takes every stride-th |Δ| of the call's scored logits, as one flat array would."""
        rows = np.flatnonzero(scored.ravel())
        V = ref.shape[-1]
        ref, got, targets = ref.reshape(-1, V), got.reshape(-1, V), targets.ravel()
        block = max(1, BLOCK_BYTES // (8 * V))
        for start in range(0, len(rows), block):
            self._add_block(ref[rows[start:start + block]], got[rows[start:start + block]].astype(np.float64),
                            targets[rows[start:start + block]], offset=start * V)

    def _add_block(self, ref: np.ndarray, got: np.ndarray, targets: np.ndarray, offset: int) -> None:
        diff = np.abs(got - ref)
        self.max_abs = max(self.max_abs, float(diff.max()))
        if self.t.atol is not None:
            self.tol_ratio = max(self.tol_ratio, float((diff / _bound(ref, self.t)).max()))
        self.sample.append(diff.ravel()[(-offset) % self.stride::self.stride].astype(np.float32))
        del diff
        ref_lp, got_lp = _log_softmax(ref), _log_softmax(got)
        self.kl.append((np.exp(ref_lp) * (ref_lp - got_lp)).sum(-1))
        self.top1 += int((ref.argmax(-1) == got.argmax(-1)).sum())
        rows = np.arange(len(targets))
        lp_ref, lp_got = ref_lp[rows, targets], got_lp[rows, targets]
        self.nll_ref -= float(lp_ref.sum())
        self.nll_got -= float(lp_got.sum())
        self.dp2 += float(((np.exp(lp_got) - np.exp(lp_ref)) ** 2).sum())
        self.n += len(targets)

    def result(self, name: str) -> VariantResult:
        kl = np.concatenate(self.kl)
        ppl_ref, ppl_got = math.exp(self.nll_ref / self.n), math.exp(self.nll_got / self.n)
        return VariantResult(
            variant=name, scored=self.n, kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)),
            top1=self.top1 / self.n, top1_low=wilson_lower(self.top1, self.n), ppl=ppl_got, ppl_reference=ppl_ref,
            ppl_ratio=ppl_got / ppl_ref, rms_dp=math.sqrt(self.dp2 / self.n), max_abs=self.max_abs,
            p99_abs=float(np.percentile(np.concatenate(self.sample), 99)), tol_ratio=self.tol_ratio)


@dataclass
class Graph:
    """One graph to judge: a variant's plain graph or its fused twin, opened when its turn comes."""
    name: str
    variant: str
    open: Callable[[], OnnxLM]
    fused: bool = False


class _ReferenceLogits:
    """The reference's logits of every call, written once to an unnamed temporary file and read back call by
    call for each graph (module docstring, "Memory")."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="onnxgen-parity-")
        self.offsets: list[tuple[int, tuple]] = []

    def append(self, logits: np.ndarray) -> None:
        logits = np.ascontiguousarray(logits, np.float32)
        self.offsets.append((self.file.tell(), logits.shape))
        self.file.write(memoryview(logits).cast("B"))

    def __getitem__(self, call: int) -> np.ndarray:
        offset, shape = self.offsets[call]
        out = np.empty(shape, np.float32)
        self.file.seek(offset)
        self.file.readinto(memoryview(out).cast("B"))
        self.file.seek(0, 2)
        return out

    def close(self) -> None:
        self.file.close()


def run_parity(graphs: list[Graph], source: Source, greedy_tokens: int = GREEDY_TOKENS,
               thresholds: dict | None = None, progress: bool = False, context: int | None = None,
               release: bool = False) -> ParityReport:
    """Every graph against the reference: the reference once over the windows (its logits to disk), then one
    graph at a time over the same calls, scored against them (module docstring, "Memory"). An fp16 graph this
    ONNX Runtime cannot open is reported "not run", never passed."""
    from tqdm import tqdm

    thresholds = thresholds or THRESHOLDS
    ref = Reference(source)
    windows = source.windows
    n, T = windows.shape
    targets = np.concatenate([windows[:, 1:], np.zeros((n, 1), np.int64)], 1)  # position t predicts t+1
    plain_scored = np.ones((n, T), bool)
    plain_scored[:, -1] = False
    split = T // 2
    prompt = windows[0, :min(16, T // 2)]
    if context is not None:  # the greedy tokens stay within the model's context (64 learned positions: 48)
        greedy_tokens = min(greedy_tokens, context - len(prompt))
    V = _full(ref, windows[:1]).shape[-1]  # the vocabulary sets the windows a call takes
    chunk = max(1, min(CHUNK, LOGITS_BUDGET // (T * V * 4)))
    stride = max(1, (n * T * V) // P99_SAMPLES)
    calls = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
    bar = tqdm(total=n * (1 + len(graphs)), desc="parity", unit="window", disable=not progress, leave=False)
    reference = _ReferenceLogits()
    try:
        for start, stop in calls:
            reference.append(_full(ref, windows[start:stop]))
            bar.update(stop - start)
        ref_greedy = _greedy(ref, prompt, greedy_tokens)
        if release:  # the reference has done its part: its model goes before the first graph opens
            source.reference = ref = None
            release_memory()
        results = []
        for g in graphs:
            t = thresholds.get(g.variant, Thresholds())
            try:
                lm = g.open()
            except UserError as e:
                if g.variant != "fp16":
                    raise
                # fp16 is built for CUDA; a CPU build of ONNX Runtime may lack its kernels. Not run, not passed.
                results.append(VariantResult(variant=g.name, status="not run", thresholds=t.describe(),
                                             note=f"ONNX Runtime could not run it here ({e})"))
                bar.update(n)
                continue
            score = _Score(t, stride)
            worst, ratio = 0.0, 0.0 if t.atol is not None else math.nan
            for call, (start, stop) in enumerate(calls):
                w, want = windows[start:stop], reference[call]
                if g.fused:
                    one_call = call > 0 and lm.keeps_logits and not lm.has_state
                    got, valid = (_extended if one_call else _teacher_forced)(lm, w)
                    scored = valid & plain_scored[start:stop]
                else:
                    got, scored = _full(lm, w), plain_scored[start:stop]
                score.add(want, got, targets[start:stop], scored)
                del got
                if not g.fused and start < CACHE_WINDOWS:  # the same windows in two steps, the second with past > 0
                    mask = np.ones_like(w)
                    pos = _positions(mask)
                    first, past = lm.forward(w[:, :split], mask[:, :split], pos[:, :split], lm.empty_past(len(w)))
                    second, _ = lm.forward(w[:, split:], mask, pos[:, split:], past)
                    for part, lo in ((first, 0), (second, split)):
                        worst = max(worst, float(np.abs(part - want[:, lo:lo + part.shape[1]]).max()))
                        ratio = max(ratio, _tol_ratio(want[:, lo:lo + part.shape[1]], part, t))
                    del first, second, past
                del want
                bar.update(stop - start)
            r = score.result(g.name)
            if not g.fused:
                r.cache_max_abs, r.cache_ratio = worst, ratio
                r.padded_max_abs, r.padded_ratio = _padded_vs_alone(lm, windows, source.pad_id, t)
            greedy = (_greedy_fused if g.fused else _greedy)(lm, prompt, greedy_tokens)
            r.greedy_match = next((i for i, (a, b) in enumerate(zip(greedy, ref_greedy)) if a != b), greedy_tokens)
            r.greedy_tokens = greedy_tokens
            results.append(r.check(t))
            del lm  # its session's memory goes before the next graph's
            release_memory()
        bar.close()
    finally:
        reference.close()
    return ParityReport(windows=n, window_length=T, source=source.name, results=results)


# ----------------------------------------------------------------------------- the stage

def _provider(variant: str) -> str:
    """fp16 is checked on CUDA when this ONNX Runtime has it (what the variant is for), else on CPU."""
    import onnxruntime as ort

    return "cuda" if variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def open_graphs(folder: Path, variants: list[str], kinds=("plain", "fused")) -> list[Graph]:
    """Each variant's plain graph and its fused twin when the export has one (of `kinds`), each opened only
    when run_parity comes to it."""
    graphs = []
    for v in variants:
        twins = [False] * ("plain" in kinds) + [True] * ("fused" in kinds and fused_path(folder, v).is_file())
        for twin in twins:
            # the fp32 and fp16 graphs without pre-packed weights: ONNX Runtime's second copy of their weights is
            # the largest thing parity could do without (0.5 GB of SmolLM2's peak, benchmarks/MEMORY.md); the
            # quantized ones keep it (MatMulNBits' packed blocks are its fast kernels' layout, and small)
            # and the plain graphs without a CPU arena (make_session: a call's logits, hundreds of MB, are freed,
            # not held under the next peak); a twin's steps return one position and keep the arena: without it
            # its teacher-forced steps ran 1.16x slower (SmolLM2 int4, 8 windows, medians of 3; plain 0.98x)
            graphs.append(Graph(f"{v} fused" if twin else v, v, partial(OnnxLM, folder, variant=v, provider=_provider(v),
                                                                       fused=twin, prepack=v not in ("fp32", "fp16"),
                                                                       arena=twin),
                                twin))
    return graphs


def parity_of(folder: Path, variants: list[str], source: Source, kinds=("plain", "fused"),
              progress: bool = False, release: bool = False) -> ParityReport:
    """Judge the export's `variants` (their plain graphs and fused twins, of `kinds`) against `source`;
    sizes and devices filled in."""
    folder = Path(folder)
    thresholds = thresholds_for(folder)
    report = run_parity(open_graphs(folder, variants, kinds), source, thresholds=thresholds, progress=progress,
                        context=read_config(folder).context, release=release)
    order = {f"{v}{s}": i for i, (v, s) in enumerate((v, s) for v in variants for s in ("", " fused"))}
    report.results.sort(key=lambda r: order[r.variant])
    for r in report.results:
        v = r.variant.split()[0]
        path = fused_path(folder, v) if r.variant.endswith("fused") else variant_path(folder, v)
        r.bytes = path.stat().st_size
        r.device = "cuda" if _provider(v) == "cuda" else "cpu"
    return report


def source_checkpoint(folder: Path) -> Path:
    """The source checkpoint the export's manifest records; a UserError when it names none or it is gone.
    Cheap: a stage asks before its work, and loads the reference (source_of) only when it needs it."""
    checkpoint = (manifest.load(folder).get("source") or {}).get("checkpoint")
    if checkpoint is None:
        raise UserError(f"export {folder}: manifest names no source checkpoint; pass --checkpoint")
    if not Path(checkpoint).exists():
        raise UserError(f"export {folder}: its source checkpoint {checkpoint} does not exist; pass --checkpoint")
    return Path(checkpoint)


def source_of(folder: Path, checkpoint: str | Path | None = None, model=None,
              min_scored: int = MIN_SCORED) -> Source:
    """The reference recorded in the export's manifest (or `checkpoint`), with the windows plan."""
    folder = Path(folder)
    if checkpoint is None:
        checkpoint = source_checkpoint(folder)
    n, T = window_plan(read_config(folder).context, min_scored)
    return open_source(folder, Path(checkpoint), n, T, model=model)


def parity_for_run(folder: Path, checkpoint: Path, variants: list[str], model=None) -> ParityReport:
    """The export in `folder` (its `variants` and their twins) against the PyTorch model it came from (`model`,
    or loaded here), which is released once its logits are written."""
    return parity_of(folder, variants, source_of(folder, checkpoint, model=model), release=True)


def check_export(folder: str | Path, checkpoint: str | Path | None = None, variants: list[str] | None = None,
                 min_scored: int = MIN_SCORED, progress: bool = True) -> ParityReport:
    """The `parity` stage: every variant present in the export (or those named), and their fused twins,
    against the source. Writes parity.json, parity.md and parity.png and records them in the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"export {folder}: folder does not exist")
    for v in variants or []:
        if not variant_path(folder, v).is_file():
            raise UserError(f"--variant {v}: {variant_path(folder, v)} does not exist in this export")
    source = source_of(folder, checkpoint, min_scored=min_scored)
    report = parity_of(folder, variants or present_variants(folder), source, progress=progress, release=True)
    files = report.write(folder)
    manifest.record(folder, "parity", files, parity=report.to_dict())
    return report
