"""Training: corpus -> tokenizer -> GPT checkpoint folder.

A run folder (models/NAME/) holds everything a later stage reads:
    config.json          the model config (GPTConfig)
    train.json           the training config and the corpus it saw
    tokenizer.json       the byte-level BPE
    data/train.bin       token ids (tokenizer.token_dtype), data/valid.bin the held-out split
    checkpoint/          model.safetensors, optimizer.safetensors, state.json; swapped in whole
    history.jsonl        one line per evaluation
    loss.png             the loss curves
Batches are drawn from a generator seeded by (seed, step), so a resumed run sees the same batches
as an uninterrupted one and ends at the same loss.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.train import ddp
from pipeline.train.corpus import load_corpus, resolve_corpus
from pipeline.train.ddp import World
from pipeline.errors import UserError
from pipeline.model.gpt import GPT, GPTConfig, from_known_keys
from pipeline.tokenizer import encode_documents, train_tokenizer
from pipeline.train.runs import checkpoint_dir, load_weights, read_tokens

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parents[2] / "models"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    block_size: int = 128         # tokens per training window, <= n_ctx
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    seed: int = 1337
    vocab_size: int = 8192        # of the tokenizer this run trains
    valid_fraction: float = 0.05
    threads: int = 0              # 0: torch's default
    # bf16 autocast for the forward pass where the CPU has bf16 arithmetic (AVX-512 BF16, AMX) or on
    # CUDA; weights, optimizer state and checkpoints stay fp32. Measured on the small preset's shape
    # (this project's 2-core AVX-512 BF16 machine, side by side): 3.2k -> 4.6k tokens/s.
    bf16: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "block_size", "eval_interval", "eval_batches", "checkpoint_interval"):
            if getattr(self, name) <= 0:
                raise UserError(f"train config: {name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"train config: {name} must be a finite number >= 0, got {value}")
        if self.lr <= 0 or not (self.beta1 < 1 and self.beta2 < 1):
            raise UserError(f"train config: expected lr > 0 and betas < 1, got lr {self.lr}, "
                            f"betas ({self.beta1}, {self.beta2})")
        if self.vocab_size < 257:  # checked here too, so that the mistake costs no corpus reading
            raise UserError(f"train config: vocab_size {self.vocab_size} must be at least 257 (256 bytes + end of text)")
        if not 0 < self.valid_fraction < 0.5:
            raise UserError(f"train config: valid_fraction must be in (0, 0.5), got {self.valid_fraction}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_known_keys(cls, d, "train config")


def load_preset(name_or_path: str) -> tuple[GPTConfig, TrainConfig]:
    """A preset is models/NAME.json (or any path): {"model": {...GPTConfig}, "train": {...TrainConfig}}."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise UserError(f"preset {name_or_path}: not found; expected one of {names} or a path to a .json file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"preset {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    d.pop("_comment", None)
    return GPTConfig.from_dict(d.get("model", {})), TrainConfig.from_dict(d.get("train", {}))


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def get_batch(data: np.ndarray, block_size: int, batch_size: int, rng: np.random.Generator):
    starts = rng.integers(0, len(data) - block_size - 1, size=batch_size)
    x = np.stack([data[s: s + block_size] for s in starts]).astype(np.int64)
    y = np.stack([data[s + 1: s + 1 + block_size] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def eval_batches(data: np.ndarray, tc: TrainConfig) -> list:
    """The fixed held-out windows every evaluation uses: tc.eval_batches global batches."""
    rng = np.random.default_rng([tc.seed, 0xE7A1])
    return [get_batch(data, tc.block_size, tc.batch_size, rng) for _ in range(tc.eval_batches)]


@torch.no_grad()
def batches_loss(model, batches: list, world: World | None = None) -> float:
    """Mean cross-entropy per counted target (-100 targets do not count) over global batches;
    under torchrun each rank scores its rows and the sums are added up."""
    world = world or World()
    was_training = model.training
    model.eval()
    total = count = 0.0
    for x, y in batches:
        rows = world.rows(len(x))
        x, y = x[rows].to(world.device), y[rows].to(world.device)
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += (y != -100).sum().item()
    total, count = world.sum([total, count])
    model.train(was_training)
    return total / max(count, 1.0)


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices, not biases, LayerNorm gains or (fixed) position tables.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run: Path, model: GPT, optimizer, state: dict, files: dict | None = None) -> None:
    """Write checkpoint.tmp/, then swap it in for checkpoint/: a kill at any moment leaves one whole.

    files: name -> tensors (a safetensors file) or text, the model's part of the checkpoint;
    default: model.safetensors with every weight (a LoRA run writes its adapter instead)."""
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if files is None:
        files = {"model.safetensors": {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}}
    for name, content in files.items():
        if isinstance(content, str):
            (tmp / name).write_text(content)
        else:
            tensors = {k: v.detach().cpu().contiguous() for k, v in content.items()}
            save_file(tensors, tmp / name, metadata={"format": "pt", "step": str(state["step"])})
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for pid, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"state.{pid}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).cpu()
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"]}, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def restore(run: Path, model: GPT, optimizer, load=None) -> dict:
    """Model, optimizer and RNG from the run's checkpoint; `load(ckpt)` reads the model's part
    (default: model.safetensors into `model`)."""
    ckpt = checkpoint_dir(run)
    state = json.loads((ckpt / "state.json").read_text())
    if load is None:
        load_weights(model, ckpt / "model.safetensors")
    else:
        load(ckpt)
    tensors = load_file(ckpt / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    opt_state: dict = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        opt_state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state


# ----------------------------------------------------------------------------- the run

def prepare_run(run: Path, config: GPTConfig, tc: TrainConfig, corpus: str | None, preset: str) -> None:
    """Tokenizer and token files, written once per run folder (resume reuses them)."""
    data = load_corpus(corpus, tc.valid_fraction, tc.seed)
    log.info("corpus %s: %d files, %.1f MB, %d train / %d valid documents",
             corpus or "(Python standard library)", data.files, data.bytes / 1e6, len(data.train), len(data.valid))
    t0 = time.time()
    tok = train_tokenizer(data.train, vocab_size=tc.vocab_size)
    log.info("tokenizer: %d tokens in %.1fs", tok.get_vocab_size(), time.time() - t0)
    config.vocab_size = tok.get_vocab_size()
    (run / "data").mkdir(parents=True, exist_ok=True)
    train_ids, valid_ids = encode_documents(tok, data.train), encode_documents(tok, data.valid)
    for name, ids in (("train", train_ids), ("valid", valid_ids)):
        if len(ids) < tc.block_size + 2:
            raise UserError(f"corpus {corpus}: the {name} split has {len(ids)} tokens, "
                            f"fewer than one window of {tc.block_size} (give more text or a smaller block_size)")
        ids.tofile(run / "data" / f"{name}.bin")
    log.info("tokens: %d train, %d valid (%.2f bytes/token)", len(train_ids), len(valid_ids),
             data.bytes / max(1, len(train_ids) + len(valid_ids)))
    tok.save(str(run / "tokenizer.json"))
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (run / "train.json").write_text(json.dumps({
        "preset": preset, "train": asdict(tc),
        "corpus": {"spec": corpus or "stdlib", "files": data.files, "bytes": data.bytes,
                   "replaced_bytes": data.replaced, "fingerprint": data.fingerprint,
                   "train_tokens": int(len(train_ids)), "valid_tokens": int(len(valid_ids))},
    }, indent=2) + "\n")


def train(out: str | Path, preset: str = "small", corpus: str | None = None, resume: bool = False,
          force: bool = False, overrides: dict | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (or resume) the run in `out`. Returns the final state: step, train and validation loss.

    Under torchrun every rank calls this; rank 0 alone prepares the folder and writes to it."""
    run = Path(out)
    world = ddp.world()
    if resume:
        if checkpoint_dir(run) is None:
            raise UserError(f"--resume: {run} has no checkpoint to resume from")
        if not (run / "train.json").is_file():
            hint = "; it is a fine-tune: resume it with `onnxgen finetune --resume`" if (run / "finetune.json").is_file() else ""
            raise UserError(f"--resume: {run} has no train.json{hint}")
        config = GPTConfig.load(run / "config.json")
        tc = TrainConfig.from_dict(json.loads((run / "train.json").read_text())["train"])
        if overrides:
            tc = TrainConfig.from_dict({**asdict(tc), **overrides})
    else:
        config, tc = load_preset(preset)
        if overrides:
            tc = TrainConfig.from_dict({**asdict(tc), **overrides})
        if tc.block_size > config.n_ctx:
            raise UserError(f"train config: block_size {tc.block_size} exceeds the model's context n_ctx {config.n_ctx}")
        world.rows(tc.batch_size)  # refuse a batch that does not split over the ranks before writing anything
        resolve_corpus(corpus)  # a mistyped preset or corpus must not cost the run --force replaces

        def prepare():  # rank 0 alone: the others would see its files appear
            if run.exists() and any(run.iterdir()) and not force:
                if checkpoint_dir(run) is None:
                    raise UserError(f"--out {run}: folder exists, is not empty and has no checkpoint to resume; "
                                    "pass --force to start over")
                raise UserError(f"--out {run}: folder exists and is not empty; pass --resume to continue "
                                "its training or --force to start over")
            if run.exists() and force:
                shutil.rmtree(run)
            created = not run.exists()
            run.mkdir(parents=True, exist_ok=True)
            try:
                prepare_run(run, config, tc, corpus, preset)
            except BaseException:
                # nothing half-written; an empty --out the user made stays
                for p in [run] if created else list(run.iterdir()):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                raise

        world.main_first(prepare)
        config = GPTConfig.load(run / "config.json")  # the tokenizer fixed vocab_size (read on every rank)
    return _loop(run, config, tc, resume, progress, stop_after)


def _loop(run: Path, config: GPTConfig, tc: TrainConfig, resume: bool, progress: bool,
          stop_after: int | None) -> dict:
    """Pre-training: random windows of the token stream."""
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    train_data, valid_data = read_tokens(run, "train"), read_tokens(run, "valid")
    model = GPT(config)
    optimizer = make_optimizer(model, tc)
    state = {"step": 0, "train_loss": None, "val_loss": None}
    if resume:
        state = restore(run, model, optimizer)
        log.info("resumed %s at step %d", run, state["step"])
    log.info("model: %.2fM parameters, %d layers, %d heads, width %d, context %d",
             model.num_parameters() / 1e6, config.n_layer, config.n_head, config.n_embd, config.n_ctx)

    def batch(step: int):
        return get_batch(train_data, tc.block_size, tc.batch_size, np.random.default_rng([tc.seed, step]))

    return fit(run, model, optimizer, tc, state, batch, eval_batches(valid_data, tc),
               lambda: save_checkpoint(run, model, optimizer, state), progress, stop_after)


def fit(run: Path, model: torch.nn.Module, optimizer, tc: TrainConfig, state: dict, batch, valid: list,
        save, progress: bool = True, stop_after: int | None = None, eval_first: bool = False) -> dict:
    """The training loop that pre-training and fine-tuning share.

    batch(step) -> (x, y): the global batch of that step, (B, T) int64 each, y = -100 where no loss;
    valid: fixed global batches for the validation loss; save(): write a checkpoint of `state`
    (rank 0 only). Under torchrun each rank runs this on its rows of every batch (see ddp.py).
    eval_first: record the validation loss before the first step (a fine-tune's starting point).
    """
    from tqdm import tqdm

    world = ddp.world()
    model.to(world.device)
    _move_optimizer_state(optimizer, world.device)
    model.train()
    net = ddp.wrap(model, world)
    history = run / "history.jsonl"
    tokens_per_step = tc.batch_size * tc.block_size
    # Redrawn in place on a terminal; in a log (CI, make), a line every 30 seconds instead.
    bar = tqdm(total=tc.steps, initial=state["step"], disable=not progress or not world.is_main, unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def evaluation(step: int, train_loss, lr: float, now: float) -> None:
        state["val_loss"] = batches_loss(model, valid, world)
        if world.is_main:
            with open(history, "a") as fh:
                fh.write(json.dumps({"step": step, "train_loss": train_loss, "val_loss": state["val_loss"],
                                     "lr": lr, "time": now}) + "\n")
            train_part = "" if train_loss is None else f"train loss {train_loss:.4f}, "
            bar.write(f"step {step}: {train_part}val loss {state['val_loss']:.4f}, "
                      f"val ppl {math.exp(state['val_loss']):.2f}")

    if eval_first and state["step"] == 0:
        evaluation(0, None, 0.0, time.time())
    mixed = tc.bf16 and bf16_available(world.device)
    t_last, loss_ema = time.time(), state["train_loss"]
    last = stop_after if stop_after is not None else tc.steps
    while state["step"] < min(tc.steps, last):
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        x, y = batch(step)
        counted = (y != -100).sum().item()  # targets that count in the whole global batch
        rows = world.rows(len(x))
        x, y = x[rows].to(world.device), y[rows].to(world.device)
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=mixed):
            logits, _ = net(x)
        logits = logits.float()
        # Sum over this rank's targets / the global count, times the ranks: DDP averages the
        # gradients over ranks, so the step is the gradient of the global batch's mean loss, however
        # the counted targets fall between ranks (a prompt/completion batch masks unevenly).
        loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        loss = loss_sum * (world.size / max(counted, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        state["step"] = step = step + 1
        state["train_loss"] = world.sum([loss_sum.item()])[0] / max(counted, 1)
        loss_ema = state["train_loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * state["train_loss"]
        now = time.time()
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tokens_per_step / max(now - t_last, 1e-9):,.0f}", refresh=False)
        bar.update(1)
        t_last = now
        if step % tc.eval_interval == 0 or step == tc.steps:
            evaluation(step, loss_ema, lr_at(step - 1, tc), now)
        if world.is_main and (step % tc.checkpoint_interval == 0 or step == tc.steps):
            save()
    bar.close()
    if world.is_main:
        plot_loss(run)
    world.barrier()  # no rank returns (and reads the run) before rank 0 has written its last checkpoint
    return state


def bf16_available(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: CUDA, or a CPU with AVX-512 BF16 / AMX (elsewhere bf16 is emulated
    and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in ("AVX512", "AVX512_BF16")
                and torch.cpu._is_avx512_bf16_supported())


def _move_optimizer_state(optimizer, device: torch.device) -> None:
    for st in optimizer.state.values():
        for key, value in st.items():
            if torch.is_tensor(value) and key != "step":
                st[key] = value.to(device)


def plot_loss(run: Path) -> None:
    history = run / "history.jsonl"
    if not history.exists():
        return
    rows = {}
    for line in history.read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r  # a resumed run rewrites the steps it replays: keep the last
    steps = sorted(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [rows[s]["train_loss"] for s in steps], label="train (EMA)")
    ax.plot(steps, [rows[s]["val_loss"] for s in steps], label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run.name}: final val ppl {math.exp(rows[steps[-1]]['val_loss']):.2f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "loss.png.tmp", dpi=100, format="png")
    plt.close(fig)
    os.replace(run / "loss.png.tmp", run / "loss.png")
