"""Fine-tuning: a trained run folder + the user's text -> a new run folder that `onnxgen export` reads.

Methods: `full` trains every weight; `lora` trains peft's low-rank adapters on the attention and
MLP projections (c_attn, c_proj, c_fc) and leaves the base frozen. The loop is train.py's `fit`
(validation loss, progress, checkpoints, resume, torchrun); what differs is the data and what a
checkpoint holds.

Data (--data FILE):
    *.jsonl   one {"prompt": ..., "completion": ...} per line; the loss counts the completion (and
              the end-of-text token after it) only: every other target is -100. One example per row,
              right-padded: an example never sees another one.
    otherwise plain text, split into paragraphs (blank lines) and trained on like the pre-training
              corpus: random windows of the token stream, every token counts.
A share of the examples or paragraphs (valid_fraction) is held out for the validation loss.

The output folder (models/NAME-METHOD/ by default):
    config.json, tokenizer.json  copied from the base run: a fine-tune changes neither
    finetune.json                method, LoRA settings, base checkpoint (path, sha256, step), data, train config
    data/{train,valid}.bin       token ids (tokenizer.token_dtype); valid.bin is also what export's parity reads
    data/*.loss.bin, *.starts.bin  JSONL only: 1 where a target counts (uint8); example offsets (int64)
    checkpoint/                  full: model.safetensors; lora: adapter_model.safetensors and
                                 adapter_config.json (peft's names) -- plus optimizer.safetensors, state.json
    history.jsonl, loss.png      as a training run; history starts at step 0 (the base model's loss)
A LoRA run refers to its base by path and sha256; `load_model` rebuilds base + adapter and refuses a
base whose weights changed since.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import manifest
from pipeline.train import ddp
from pipeline.errors import UserError
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer import encode_documents, eot_id, load_tokenizer, token_dtype
from pipeline.train.loop import TrainConfig, fit, get_batch, make_optimizer, restore, save_checkpoint
from pipeline.train.runs import (adapter_files, checkpoint_dir, load_adapter, load_model,
                                 weights_sha256)

log = logging.getLogger(__name__)

METHODS = ("full", "lora")

# A fine-tune is short and starts from a good model: a short warmup, lower rates than pre-training.
# LoRA's adapters start at zero (B = 0) and are few, so they take a larger rate and no weight decay.
DEFAULTS = {
    "full": {"steps": 200, "lr": 1e-4, "min_lr": 1e-5, "warmup": 20},
    "lora": {"steps": 200, "lr": 1e-3, "min_lr": 1e-4, "warmup": 20, "weight_decay": 0.0},
}
COMMON = {"eval_interval": 50, "checkpoint_interval": 50, "eval_batches": 8, "valid_fraction": 0.1}


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # attention and MLP projections

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.rank <= 0:
            raise UserError(f"--rank {self.rank}: must be positive")
        if self.alpha <= 0:
            raise UserError(f"--alpha {self.alpha}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout {self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise UserError("--target-modules: empty; expected names such as c_attn,c_proj,c_fc")


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    ids: np.ndarray                # (N,) token stream, every example or paragraph ending in end-of-text
    counts: np.ndarray | None      # (N,) uint8, 1 where predicting this token counts (JSONL)
    starts: np.ndarray | None      # (E+1,) int64 example boundaries (JSONL); None: plain text

    def save(self, folder: Path, name: str) -> None:
        self.ids.tofile(folder / f"{name}.bin")
        if self.starts is not None:
            self.counts.tofile(folder / f"{name}.loss.bin")
            self.starts.tofile(folder / f"{name}.starts.bin")

    @classmethod
    def load(cls, folder: Path, name: str, dtype) -> "Split":
        ids = np.fromfile(folder / f"{name}.bin", dtype=dtype)
        if not (folder / f"{name}.starts.bin").is_file():
            return cls(ids, None, None)
        return cls(ids, np.fromfile(folder / f"{name}.loss.bin", dtype=np.uint8),
                   np.fromfile(folder / f"{name}.starts.bin", dtype=np.int64))

    def batch(self, block_size: int, batch_size: int, rng: np.random.Generator, pad_id: int):
        """(x, y), (B, T) int64: random windows of plain text, or whole examples right-padded to the
        longest in the batch (truncated to block_size), y = -100 at the prompt and the padding."""
        if self.starts is None:
            return get_batch(self.ids, block_size, batch_size, rng)
        picks = rng.integers(0, len(self.starts) - 1, size=batch_size)
        spans = [(int(self.starts[i]), min(int(self.starts[i + 1]), int(self.starts[i]) + block_size + 1)) for i in picks]
        T = max(e - s for s, e in spans) - 1
        x = np.full((batch_size, T), pad_id, dtype=np.int64)
        y = np.full((batch_size, T), -100, dtype=np.int64)
        for b, (s, e) in enumerate(spans):
            n = e - s - 1
            x[b, :n] = self.ids[s: e - 1]
            y[b, :n] = np.where(self.counts[s + 1: e] == 1, self.ids[s + 1: e].astype(np.int64), -100)
        return torch.from_numpy(x), torch.from_numpy(y)


def read_data(path: Path) -> tuple[str, list]:
    """("jsonl", [(prompt, completion), ...]) or ("text", [paragraph, ...])."""
    if not path.is_file():
        raise UserError(f"--data {path}: " + ("a folder; expected a text or .jsonl file" if path.is_dir()
                                              else "file does not exist"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--data {path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix.lower() == ".jsonl":
        examples = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--data {path}: line {n}: not valid JSON ({e.msg})") from None
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                    and isinstance(row.get("completion"), str)):
                raise UserError(f"--data {path}: line {n}: expected an object with string fields "
                                '"prompt" and "completion"')
            if not row["completion"]:
                raise UserError(f"--data {path}: line {n}: empty completion (nothing to learn)")
            examples.append((row["prompt"], row["completion"]))
        return "jsonl", examples
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 2:  # one block of text: its lines are the units to hold out from
        paragraphs = [line for line in text.splitlines() if line.strip()]
    return "text", paragraphs


def prepare_data(path: Path, run: Path, tok, tc: TrainConfig, n_ctx: int) -> dict:
    """Tokenize the data with the base's tokenizer, hold out a share, write data/. Returns its summary."""
    kind, items = read_data(path)
    if len(items) < 2:
        raise UserError(f"--data {path}: {len(items)} {'examples' if kind == 'jsonl' else 'paragraphs'}; "
                        "need at least 2 (one is held out for the validation loss)")
    order = np.random.default_rng(tc.seed).permutation(len(items))
    n_valid = max(1, round(len(items) * tc.valid_fraction))
    chosen = {"valid": [items[i] for i in sorted(order[:n_valid])], "train": [items[i] for i in sorted(order[n_valid:])]}
    (run / "data").mkdir(parents=True, exist_ok=True)
    eot = eot_id(tok)
    summary = {"spec": str(path), "format": kind, "sha256": manifest.sha256(path)}
    for name, part in chosen.items():
        if kind == "jsonl":
            prompts = tok.encode_batch([p for p, _ in part], add_special_tokens=False)
            completions = tok.encode_batch([c for _, c in part], add_special_tokens=False)
            ids, counts, starts = [], [], [0]
            for p, c in zip(prompts, completions):
                ids += p.ids + c.ids + [eot]
                counts += [0] * len(p.ids) + [1] * (len(c.ids) + 1)
                starts.append(len(ids))
            split = Split(np.asarray(ids, token_dtype(tok.get_vocab_size())), np.asarray(counts, np.uint8), np.asarray(starts, np.int64))
        else:
            split = Split(encode_documents(tok, part), None, None)
            if len(split.ids) < tc.block_size + 2:
                raise UserError(f"--data {path}: the {name} split has {len(split.ids)} tokens, fewer than one "
                                f"window of {tc.block_size} (give more text or a smaller --block-size)")
        split.save(run / "data", name)
        summary[f"{name}_items"], summary[f"{name}_tokens"] = len(part), int(len(split.ids))
    # export's parity scores windows of min(128, n_ctx - 1) + 1 held-out tokens (parity.run_windows):
    # refuse now rather than after the training
    need = min(128, n_ctx - 1) + 1
    if summary["valid_tokens"] < need:
        raise UserError(f"--data {path}: the held-out split has {summary['valid_tokens']} tokens; export's parity "
                        f"check needs {need} (give more data or a larger valid_fraction)")
    return summary


# ----------------------------------------------------------------------------- models

def _lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none")


def _check_targets(model: GPT, settings: LoraSettings) -> None:
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in settings.target_modules if t not in linear - {"lm_head"}]
    if unknown:
        raise UserError(f"--target-modules: {unknown} are not projections of this model; "
                        f"expected some of {sorted(linear - {'lm_head'})}")


# ----------------------------------------------------------------------------- the run

def finetune(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, method: str = "lora",
             lora: LoraSettings | None = None, resume: bool = False, force: bool = False,
             overrides: dict | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Fine-tune the run `checkpoint` on `data` into the run folder `out`. Returns the final state
    (step, train and validation loss, the validation loss before fine-tuning, trainable parameters)."""
    base, data = Path(checkpoint), Path(data)
    if method not in METHODS:
        raise UserError(f"--method {method}: expected one of {', '.join(METHODS)}")
    if method == "full" and lora is not None:
        raise UserError("--rank/--alpha/--dropout/--target-modules: only for --method lora")
    run = Path(out) if out is not None else base.parent / f"{base.name}-{method}"
    world = ddp.world()
    if resume:
        if checkpoint_dir(run) is None or not (run / "finetune.json").is_file():
            raise UserError(f"--resume: {run} has no fine-tune checkpoint to resume from")
        spec = json.loads((run / "finetune.json").read_text())
        if spec["method"] != method:
            raise UserError(f"--resume: {run} was fine-tuned with --method {spec['method']}, not {method}")
        if Path(spec["base"]["checkpoint"]) != base.resolve():
            raise UserError(f"--resume: {run} was fine-tuned from {spec['base']['checkpoint']}, not {base.resolve()}")
        if data.is_file() and manifest.sha256(data) != spec["data"]["sha256"]:
            raise UserError(f"--resume: --data {data} is not the file {run} was fine-tuned on (sha256 differs)")
        tc = TrainConfig.from_dict({**spec["train"], **(overrides or {})})
        lora = LoraSettings(**spec["lora"]) if spec["lora"] else None
    else:
        if checkpoint_dir(base) is None:
            raise UserError(f"checkpoint {base}: has no checkpoint (train it first)")
        base_config = GPTConfig.load(base / "config.json")
        base_train = {}  # batch and window sizes, and bf16, come from how the base was trained (or fine-tuned)
        for name in ("train.json", "finetune.json"):
            if (base / name).is_file():
                base_train = json.loads((base / name).read_text())["train"]
        tc = TrainConfig.from_dict({
            "batch_size": base_train.get("batch_size", 16), "block_size": base_train.get("block_size", 128),
            "seed": base_train.get("seed", 1337), "threads": base_train.get("threads", 0),
            "bf16": base_train.get("bf16", False),  # runs from before bf16 autocast trained in fp32
            **COMMON, **DEFAULTS[method], **(overrides or {})})
        if tc.block_size > base_config.n_ctx:
            raise UserError(f"--block-size {tc.block_size}: exceeds the model's context n_ctx {base_config.n_ctx}")
        lora = (lora or LoraSettings()) if method == "lora" else None
        if lora:
            with torch.device("meta"):  # the module names alone: no memory, no weights read
                _check_targets(GPT(base_config), lora)
        world.rows(tc.batch_size)  # refuse what cannot run before anything is written

        def prepare():
            if run.exists() and any(run.iterdir()):
                if not force:
                    raise UserError(f"--out {run}: folder exists and is not empty; pass --resume to continue "
                                    "its fine-tuning or --force to start over")
                shutil.rmtree(run)
            run.mkdir(parents=True, exist_ok=True)
            try:
                tok = load_tokenizer(base)
                summary = prepare_data(data, run, tok, tc, base_config.n_ctx)
                shutil.copyfile(base / "config.json", run / "config.json")
                tok.save(str(run / "tokenizer.json"))
                ckpt = checkpoint_dir(base)
                spec = {"method": method, "lora": asdict(lora) if lora else None,
                        "base": {"checkpoint": str(base.resolve()), "weights_sha256": weights_sha256(base),
                                 "step": json.loads((ckpt / "state.json").read_text())["step"]},
                        "data": summary, "train": asdict(tc)}
                (run / "finetune.json").write_text(json.dumps(spec, indent=2) + "\n")
            except BaseException:
                shutil.rmtree(run, ignore_errors=True)  # nothing half-written
                raise

        world.main_first(prepare)
    return _finetune_loop(run, base, method, lora, tc, resume, progress, stop_after)


def _finetune_loop(run: Path, base: Path, method: str, lora: LoraSettings | None, tc: TrainConfig, resume: bool,
                   progress: bool, stop_after: int | None) -> dict:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # LoRA's A matrices start random: the same on every rank
    model = load_model(base)
    dtype = token_dtype(model.config.vocab_size)
    pad = eot_id(load_tokenizer(run))
    total = model.num_parameters()
    if method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora))
        files = lambda: adapter_files(model)  # noqa: E731
        load = lambda ckpt: load_adapter(model, ckpt)  # noqa: E731
    else:
        files = load = None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s fine-tune: %s trainable parameters of %s (%.2f%%)", method, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / total)
    optimizer = make_optimizer(model, tc)
    state = {"step": 0, "train_loss": None, "val_loss": None}
    if resume:
        state = restore(run, model, optimizer, load)
        log.info("resumed %s at step %d", run, state["step"])
    train_split, valid_split = Split.load(run / "data", "train", dtype), Split.load(run / "data", "valid", dtype)
    rng = np.random.default_rng([tc.seed, 0xE7A1])
    valid = [valid_split.batch(tc.block_size, tc.batch_size, rng, pad) for _ in range(tc.eval_batches)]

    def batch(step: int):
        return train_split.batch(tc.block_size, tc.batch_size, np.random.default_rng([tc.seed, step]), pad)

    def save():
        save_checkpoint(run, model, optimizer, state, files() if files else None)

    state = fit(run, model, optimizer, tc, state, batch, valid, save, progress, stop_after, eval_first=True)
    first = json.loads((run / "history.jsonl").read_text().splitlines()[0]) if (run / "history.jsonl").is_file() else {}
    return {**state, "val_loss_before": first.get("val_loss"), "trainable_parameters": trainable,
            "total_parameters": total}
