"""Parity: each ONNX variant against the PyTorch fp32 model on the same held-out token windows.

The pattern of minGPT's Hugging Face test, made numeric: logits close, the same greedy tokens.
Measured per variant:
    max_abs, p99_abs     |Δlogit| over every position of every window (past 0, batch of windows)
    cache_max_abs        the same windows fed in two steps (prefix, then the rest with past > 0)
    padded_max_abs       a left-padded batch of 4 rows against each row run alone (same variant)
    top1                 agreement of the argmax token
    kl                   mean KL(PyTorch || variant) per position
    ppl, ppl_change_pct  perplexity of the windows' next tokens, and its change against PyTorch
    greedy_match         greedy tokens before the first disagreement (of `greedy_tokens`)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline import manifest
from pipeline.check.sources import Source, open_source
from pipeline.errors import UserError
from pipeline.exports import present_variants, variant_path
from pipeline.run.lm import OnnxLM

# reference(input_ids, attention_mask, position_ids, past) -> (logits, presents), torch tensors
Reference = Callable


@dataclass
class Thresholds:
    max_abs: float | None = None
    top1: float | None = None           # minimum agreement, 0..1
    ppl_change_pct: float | None = None  # maximum |change| in percent
    greedy_identical: bool = False
    structural: float | None = None     # bound on cache_max_abs and padded_max_abs

    def describe(self) -> str:
        parts = []
        if self.max_abs is not None:
            parts.append(f"max |Δ| ≤ {self.max_abs:g}")
        if self.structural is not None:
            parts.append(f"cache/padded |Δ| ≤ {self.structural:g}")
        if self.top1 is not None:
            parts.append(f"top-1 ≥ {self.top1:.0%}")
        if self.ppl_change_pct is not None:
            parts.append(f"|Δppl| ≤ {self.ppl_change_pct:g}%")
        if self.greedy_identical:
            parts.append("greedy identical")
        return ", ".join(parts)


# The held-out windows every variant is judged on (sources.py)
N_WINDOWS, WINDOW_LENGTH = 8, 128

# Per variant, as issue 3 sets them. fp16's bound is on logits only: its past/present are fp16 by design.
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(max_abs=1e-4, structural=1e-4, greedy_identical=True),
    "int8": Thresholds(top1=0.99, ppl_change_pct=0.5),
    "int4": Thresholds(top1=0.97, ppl_change_pct=1.5),
    "fp16": Thresholds(max_abs=1e-2),
}


@dataclass
class VariantResult:
    variant: str
    max_abs: float
    p99_abs: float
    cache_max_abs: float
    padded_max_abs: float
    top1: float
    kl: float
    ppl: float
    ppl_reference: float
    ppl_change_pct: float
    greedy_match: int
    greedy_tokens: int
    thresholds: str = ""
    failures: list[str] = field(default_factory=list)
    status: str = "pass"      # "pass", "fail" or "not run"
    note: str = ""
    bytes: int = 0            # the variant's file size
    device: str = "cpu"

    @classmethod
    def not_run(cls, variant: str, note: str, t: Thresholds, size: int = 0) -> "VariantResult":
        """A variant that could not be measured here: reported as such, never as passed."""
        nan = float("nan")
        return cls(variant=variant, max_abs=nan, p99_abs=nan, cache_max_abs=nan, padded_max_abs=nan, top1=nan,
                   kl=nan, ppl=nan, ppl_reference=nan, ppl_change_pct=nan, greedy_match=0, greedy_tokens=0,
                   thresholds=t.describe(), status="not run", note=note, bytes=size)

    def check(self, t: Thresholds) -> "VariantResult":
        self.thresholds = t.describe()
        f = []
        if t.max_abs is not None and not self.max_abs <= t.max_abs:
            f.append(f"max |Δlogit| {self.max_abs:.3g} > {t.max_abs:g}")
        if t.structural is not None:
            for name in ("cache_max_abs", "padded_max_abs"):
                if not getattr(self, name) <= t.structural:
                    f.append(f"{name} {getattr(self, name):.3g} > {t.structural:g}")
        if t.top1 is not None and not self.top1 >= t.top1:
            f.append(f"top-1 agreement {self.top1:.2%} < {t.top1:.0%}")
        if t.ppl_change_pct is not None and not abs(self.ppl_change_pct) <= t.ppl_change_pct:
            f.append(f"perplexity change {self.ppl_change_pct:+.3f}% beyond ±{t.ppl_change_pct:g}%")
        if t.greedy_identical and self.greedy_match < self.greedy_tokens:
            f.append(f"greedy generation differs at token {self.greedy_match + 1} of {self.greedy_tokens}")
        self.failures = f
        self.status = "fail" if f else "pass"
        return self


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.cumsum(-1) - 1, 0, None)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class _Torch:
    """The reference run through the same contract as the graph (numpy in, numpy out)."""

    def __init__(self, reference: Reference, empty_past: Callable[[int], list]):
        self.reference, self.empty_past = reference, empty_past

    @torch.no_grad()
    def forward(self, ids, mask, pos, past):
        logits, presents = self.reference(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos),
                                          [torch.from_numpy(p) for p in past])
        return logits.float().numpy(), [p.numpy() for p in presents]


def _full(model, windows: np.ndarray) -> np.ndarray:
    mask = np.ones_like(windows)
    return model.forward(windows, mask, _positions(mask), model.empty_past(len(windows)))[0]


def _two_step(model, windows: np.ndarray, split: int) -> np.ndarray:
    mask = np.ones_like(windows)
    pos = _positions(mask)
    first, past = model.forward(windows[:, :split], mask[:, :split], pos[:, :split], model.empty_past(len(windows)))
    second, _ = model.forward(windows[:, split:], mask, pos[:, split:], past)
    return np.concatenate([first, second], axis=1)


def _padded_vs_alone(model, windows: np.ndarray, pad_id: int) -> float:
    """Left-pad 4 rows of different lengths; each row's logits must equal that row run alone,
    at the prompt and at one further step with past > 0."""
    L = windows.shape[1]
    lengths = [L, (3 * L) // 4, L // 2, max(2, L // 4)]
    rows = [windows[i % len(windows), :n] for i, n in enumerate(lengths)]
    ids = np.full((4, L), pad_id, dtype=np.int64)
    mask = np.zeros((4, L), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    pos = _positions(mask)
    batch_logits, past = model.forward(ids, mask, pos, model.empty_past(4))
    nxt = batch_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask2 = np.concatenate([mask, np.ones((4, 1), np.int64)], 1)
    step_logits, _ = model.forward(nxt, mask2, pos[:, -1:] + 1, past)
    worst = 0.0
    for b, r in enumerate(rows):
        r = r[None]
        alone, alone_past = model.forward(r, np.ones_like(r), _positions(np.ones_like(r)), model.empty_past(1))
        m = np.ones((1, r.shape[1] + 1), np.int64)
        alone_step, _ = model.forward(nxt[b:b + 1], m, np.array([[r.shape[1]]]), alone_past)
        worst = max(worst, float(np.abs(batch_logits[b, L - r.shape[1]:] - alone[0]).max()),
                    float(np.abs(step_logits[b] - alone_step[0]).max()))
    return worst


def _greedy(model, prompt: np.ndarray, n: int, eos_id: int | None = None) -> list[int]:
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


def compare(variant: str, lm, reference: _Torch, windows: np.ndarray, pad_id: int, greedy_tokens: int,
            ref_cache: dict) -> VariantResult:
    """One variant (an OnnxLM) against the reference. ref_cache keeps the reference's work across variants."""
    if "full" not in ref_cache:
        ref_cache["full"] = _full(reference, windows)
        prompt_len = min(16, windows.shape[1] // 2)
        ref_cache["prompt"] = windows[0, :prompt_len]
        ref_cache["greedy"] = _greedy(reference, ref_cache["prompt"], greedy_tokens)
    ref = ref_cache["full"]
    got = _full(lm, windows)
    diff = np.abs(got.astype(np.float64) - ref)
    split = windows.shape[1] // 2
    cache = float(np.abs(_two_step(lm, windows, split) - ref).max())
    padded = _padded_vs_alone(lm, windows, pad_id)
    ref_lp, got_lp = _log_softmax(ref), _log_softmax(got)
    kl = float((np.exp(ref_lp) * (ref_lp - got_lp)).sum(-1).mean())
    targets = windows[:, 1:]
    nll_ref = -np.take_along_axis(ref_lp[:, :-1], targets[..., None], -1).mean()
    nll_got = -np.take_along_axis(got_lp[:, :-1], targets[..., None], -1).mean()
    ppl_ref, ppl_got = math.exp(nll_ref), math.exp(nll_got)
    greedy = _greedy(lm, ref_cache["prompt"], greedy_tokens)
    match = next((i for i, (a, b) in enumerate(zip(greedy, ref_cache["greedy"])) if a != b), greedy_tokens)
    return VariantResult(
        variant=variant, max_abs=float(diff.max()), p99_abs=float(np.percentile(diff, 99)),
        cache_max_abs=cache, padded_max_abs=padded, top1=float((got.argmax(-1) == ref.argmax(-1)).mean()),
        kl=kl, ppl=ppl_got, ppl_reference=ppl_ref, ppl_change_pct=100.0 * (ppl_got / ppl_ref - 1.0),
        greedy_match=match, greedy_tokens=greedy_tokens,
    )


@dataclass
class ParityReport:
    windows: int
    window_length: int
    source: str
    results: list[VariantResult]

    @property
    def passed(self) -> bool:
        return all(r.status != "fail" for r in self.results)

    def to_dict(self) -> dict:
        def clean(d):  # NaN (a variant not run) is not JSON
            return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
        return {"windows": self.windows, "window_length": self.window_length, "source": self.source,
                "passed": self.passed, "variants": {r.variant: clean(asdict(r)) for r in self.results}}

    def markdown(self) -> str:
        lines = [
            "# Parity report",
            "",
            f"Each variant against the PyTorch fp32 model ({self.source}) on {self.windows} held-out windows "
            f"of {self.window_length} tokens. |Δ| is the absolute logit difference; `cache` feeds the windows in "
            "two steps (past > 0); `padded` is a left-padded batch of 4 against each row alone; greedy counts "
            "the tokens generated before the first disagreement.",
            "",
            "| variant | size | status | max abs Δ | p99 abs Δ | cache Δ | padded Δ | top-1 | KL | ppl (PyTorch) | Δppl | greedy | thresholds |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.results:
            size = f"{r.bytes / 1e6:.2f} MB" if r.bytes else ""
            if r.status == "not run":
                lines.append(f"| {r.variant} | {size} | not run | | | | | | | | | | {r.thresholds}; {r.note} |")
                continue
            lines.append(
                f"| {r.variant}{' (cuda)' if r.device == 'cuda' else ''} | {size} | {r.status} | {r.max_abs:.2e} | {r.p99_abs:.2e} | {r.cache_max_abs:.2e} | "
                f"{r.padded_max_abs:.2e} | {r.top1:.2%} | {r.kl:.2e} | {r.ppl:.3f} ({r.ppl_reference:.3f}) | "
                f"{r.ppl_change_pct:+.3f}% | {r.greedy_match}/{r.greedy_tokens} | {r.thresholds} |")
        failures = [f"- {r.variant}: {f}" for r in self.results for f in r.failures]
        if failures:
            lines += ["", "## Failures", "", *failures]
        return "\n".join(lines) + "\n"

    def write(self, folder: Path) -> list[str]:
        """parity.json, parity.md and parity.png (the chart) in folder; returns their names."""
        (folder / "parity.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (folder / "parity.md").write_text(self.markdown())
        self.chart(folder / "parity.png")
        return ["parity.json", "parity.md", "parity.png"]

    def chart(self, path: Path) -> None:
        """One bar chart per metric, a bar per variant, its threshold as a dashed line."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.results if r.status != "not run"]
        names = [r.variant for r in rows]
        colors = ["tab:green" if r.status == "pass" else "tab:red" for r in rows]
        panels = [("max |Δlogit|", "max_abs", "max_abs", True), ("top-1 agreement %", "top1", "top1", False),
                  ("|Δppl| %", "ppl_change_pct", "ppl_change_pct", True), ("KL(PyTorch‖variant)", "kl", None, True),
                  ("size MB", "bytes", None, False)]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
        for ax, (title, key, tkey, log) in zip(axes, panels):
            scale = 100.0 if key == "top1" else 1e-6 if key == "bytes" else 1.0
            values = [abs(getattr(r, key)) * scale for r in rows]
            ax.bar(names, [max(v, 1e-12) if log else v for v in values], color=colors)
            if log:
                ax.set_yscale("log")
            for r, x in zip(rows, range(len(rows))):
                t = getattr(THRESHOLDS.get(r.variant, Thresholds()), tkey, None) if tkey else None
                if t is not None:
                    ax.hlines(t * scale, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
            if key == "top1":  # zoom in: the interesting range is the last few percent
                ax.set_ylim(min([*values, 96.0]) - 1.0, 100.2)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=8)
        fig.suptitle(f"parity against PyTorch fp32 ({self.windows}×{self.window_length} held-out tokens); "
                     "dashed: threshold, red: missed", fontsize=9)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)


def run_parity(lms: dict, reference: Reference, empty_past, windows: np.ndarray, pad_id: int,
               source: str, greedy_tokens: int = 64, thresholds: dict | None = None) -> ParityReport:
    """lms: variant -> OnnxLM. reference follows the graph contract in torch."""
    thresholds = thresholds or THRESHOLDS
    ref = _Torch(reference, empty_past)
    ref_cache: dict = {}
    results = []
    for variant, lm in lms.items():
        r = compare(variant, lm, ref, windows, pad_id, greedy_tokens, ref_cache)
        results.append(r.check(thresholds.get(variant, Thresholds())))
    return ParityReport(windows=len(windows), window_length=windows.shape[1], source=source, results=results)


def parity_for_run(folder: Path, checkpoint: Path, variants: list[str], model=None) -> ParityReport:
    """The export in `folder` (its `variants`) against the PyTorch model it came from (sources.py)."""
    source = open_source(folder, checkpoint, N_WINDOWS, WINDOW_LENGTH, model=model)
    return parity_of_variants(folder, variants, source)


def parity_of_variants(folder: Path, variants: list[str], source: Source) -> ParityReport:
    """Load each variant of the export and compare it with `reference` (any source). An fp16 variant
    that this ONNX Runtime cannot run is reported "not run", never passed; every result gets its size."""
    lms, skipped = {}, {}
    for v in variants:
        try:
            lms[v] = OnnxLM(folder, variant=v, provider=_provider(v))
        except UserError as e:
            if v != "fp16":
                raise
            # fp16 is built for CUDA; a CPU build of ONNX Runtime may lack its kernels. Not run, not passed.
            skipped[v] = f"ONNX Runtime could not run it here ({e})"
    report = run_parity(lms, source.reference, source.empty_past, source.windows, source.pad_id, source=source.name)
    for v, note in skipped.items():
        report.results.append(VariantResult.not_run(v, note, THRESHOLDS.get(v, Thresholds())))
    order = {v: i for i, v in enumerate(variants)}
    report.results.sort(key=lambda r: order[r.variant])
    for r in report.results:
        r.bytes = variant_path(folder, r.variant).stat().st_size
        r.device = "cuda" if _provider(r.variant) == "cuda" else "cpu"
    return report


def _provider(variant: str) -> str:
    """fp16 is checked on CUDA when this ONNX Runtime has it (what the variant is for), else on CPU."""
    import onnxruntime as ort

    return "cuda" if variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def check_export(folder: str | Path, checkpoint: str | Path | None = None,
                 variants: list[str] | None = None) -> ParityReport:
    """The `parity` stage: every variant present in the export (or those named) against its source.
    Writes parity.json, parity.md and parity.png and records them in the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"export {folder}: folder does not exist")
    if checkpoint is None:
        source = manifest.load(folder).get("source") or {}
        if "checkpoint" not in source:
            raise UserError(f"export {folder}: manifest names no source checkpoint; pass --checkpoint")
        checkpoint = source["checkpoint"]
    present = present_variants(folder)
    for v in variants or []:
        if not variant_path(folder, v).is_file():
            raise UserError(f"--variant {v}: {variant_path(folder, v)} does not exist in this export")
    report = parity_for_run(folder, Path(checkpoint), variants or present)
    files = report.write(folder)
    manifest.record(folder, "parity", files, parity=report.to_dict())
    return report
