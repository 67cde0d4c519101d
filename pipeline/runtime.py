"""The ONNX Runtime generation loop: an export folder in, tokens out.

    lm = OnnxLM("exports/default")
    for piece in lm.stream("def parse_args(", max_new_tokens=64):
        print(piece, end="", flush=True)

Everything is read from the folder: shapes from the graph, ids from generation_config.json,
the context length from config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import UserError
from pipeline.layout import INPUTS, variant_path
from pipeline.preflight import preflight
from pipeline.sampling import Sampler, SamplingConfig
from pipeline.tokenizer import load_tokenizer

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path}: file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: not valid JSON ({e})") from None


def context_length(config: dict) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if key in config:
            return int(config[key])
    raise UserError("config.json: has no context length (n_positions or max_position_embeddings)")


def make_session(path: Path, provider: str = "cpu", threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {path}: ONNX Runtime cannot load it ({first})") from None


@dataclass
class Generation:
    """What one generate() call produced, filled in as it streams."""
    tokens: list[list[int]] = field(default_factory=list)   # new ids, per row
    stop_reason: list[str] = field(default_factory=list)    # "eos", "length" or "context", per row


class OnnxLM:
    def __init__(self, folder: str | Path, variant: str = "fp32", provider: str = "cpu", threads: int = 0,
                 verify: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"export {self.folder}: folder does not exist")
        preflight(self.folder, variant, provider, verify)  # untrusted files: checked before anything reads them
        self.config = read_json(self.folder / "config.json", "config")
        gen = read_json(self.folder / "generation_config.json", "generation config")
        self.tokenizer = load_tokenizer(self.folder / "tokenizer.json", require_eot=False)  # eos: generation_config
        eos = gen["eos_token_id"]  # a list in some imported models (Llama 3, Qwen2.5): stop on the first
        self.eos_id = int(eos[0] if isinstance(eos, list) else eos)
        self.pad_id = int(gen.get("pad_token_id", self.eos_id))
        self.n_ctx = context_length(self.config)
        path = variant_path(self.folder, variant)
        if not path.is_file():
            raise UserError(f"--variant {variant}: {path} does not exist in this export")
        self.session = make_session(path, provider, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        missing = [n for n in INPUTS if n not in inputs]
        if missing or not self.past_names:
            raise UserError(f"model {path}: not a decoder with KV cache (missing inputs {missing or 'past_key_values.*'})")
        first = inputs[self.past_names[0]]
        _, self.n_kv_heads, _, self.head_dim = first.shape  # fixed integers by contract
        self.past_dtype = _ORT_TO_NUMPY[first.type]
        vocab = self.tokenizer.get_vocab_size()
        if vocab > int(self.config.get("vocab_size", vocab)):
            raise UserError(f"tokenizer {self.folder / 'tokenizer.json'}: {vocab} tokens, more than the "
                            f"model's vocab_size {self.config['vocab_size']}")

    # ------------------------------------------------------------------ one forward step
    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def forward(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits, present

    # ------------------------------------------------------------------ the loop
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def check_prompt(self, ids: list[int], label: str = "prompt") -> None:
        if not ids:
            raise UserError(f"{label}: empty (expected at least one token)")
        if len(ids) >= self.n_ctx:
            raise UserError(f"{label}: {len(ids)} tokens, but the model's context is {self.n_ctx} "
                            f"(at most {self.n_ctx - 1} leaves room for one new token)")

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64,
                 sampling: SamplingConfig | None = None, stop_at_eos: bool = True,
                 result: Generation | None = None) -> Iterator[np.ndarray]:
        """Yields the next ids (B,) at each step; rows are left-padded and stop on their own.

        A finished row keeps receiving the pad id so the batch stays rectangular.
        """
        for i, p in enumerate(prompts):
            self.check_prompt(p, f"prompt {i + 1}" if len(prompts) > 1 else "prompt")
        sampler = Sampler(sampling or SamplingConfig())
        result = result if result is not None else Generation()
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = p
            mask[b, T - len(p):] = 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        past = self.empty_past(B)
        done = np.zeros(B, dtype=bool)
        result.tokens = [[] for _ in range(B)]
        result.stop_reason = [""] * B
        lengths = np.array([len(p) for p in prompts])
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, mask, positions, past)
            nxt = sampler(logits[:, -1, :])
            nxt = np.where(done, self.pad_id, nxt)
            for b in np.flatnonzero(~done):
                result.tokens[b].append(int(nxt[b]))
            lengths += ~done
            yield nxt
            finished_now = ~done & (nxt == self.eos_id) if stop_at_eos else np.zeros(B, bool)
            for b in np.flatnonzero(finished_now):
                result.stop_reason[b] = "eos"
            done |= finished_now
            full = ~done & (lengths >= self.n_ctx)
            for b in np.flatnonzero(full):
                result.stop_reason[b] = "context"
            done |= full
            if done.all():
                break
            ids = nxt[:, None]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        for b in range(B):
            result.stop_reason[b] = result.stop_reason[b] or "length"

    def stream(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
               result: Generation | None = None) -> Iterator[str]:
        """Text pieces as they are generated (whole UTF-8 characters only)."""
        ids = self.encode(prompt)
        produced: list[int] = []
        shown = ""
        for nxt in self.generate([ids], max_new_tokens, sampling, result=result):
            token = int(nxt[0])
            if token == self.eos_id:
                break
            produced.append(token)
            text = self.tokenizer.decode(produced)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(produced)
        if text != shown:
            yield text[len(shown):]
