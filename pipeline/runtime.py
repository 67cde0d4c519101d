"""The ONNX Runtime generation loop: an export folder in, tokens out.

    lm = OnnxLM("exports/default", fused="auto")
    for piece in lm.stream("def parse_args(", max_new_tokens=64):
        print(piece, end="", flush=True)

Everything is read from the folder: shapes from the graph, ids from generation_config.json,
the context length from config.json.

Two loops, one bookkeeping (stops, sampling, per-row state):
  - fused (onnx/*_gqa.onnx, see fuse.py): one (B, H, max_length, D) OrtValue per cache tensor,
    allocated once per generation and bound as both past and present, so GroupQueryAttention
    appends in place; logits come back (B, 1, V) straight into a NumPy buffer. Prompts are
    right-padded, each row keeps its own length. On CUDA the cache stays on the device.
  - plain (the DESIGN.md contract graph): left padding, presents fed back as OrtValues through
    IO binding (no NumPy round trip), the cache grows by Concat inside the graph.
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


def first_id(ids) -> int:
    """generation_config's eos_token_id: an id, or a list of them in some imported models (Llama 3,
    Qwen2.5); the first is the one to emit and pad with."""
    return int(ids[0] if isinstance(ids, list) else ids)


def context_length(config: dict) -> int:
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if key in config:
            return int(config[key])
    raise UserError("config.json: has no context length (n_positions or max_position_embeddings)")


def require_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                        "(install onnxruntime-gpu instead of onnxruntime: make install GPU=1)")


def make_session(path: Path, provider: str = "cpu", threads: int = 0, spin: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # No spin-waiting by default: between two steps the core goes to Python (sampling, stops), and a
    # worker spinning for the next kernel takes it. Measured on this project's shared 2-core machine:
    # 1528 vs 418 tok/s for the small preset's int4 fused graph (benchmarks/RESULTS.md has both rows).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        require_cuda()
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages, when they are there
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {path}: ONNX Runtime cannot load it ({first})") from None
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu falls back to CPU silently when libcublas/libcudnn cannot be loaded
        raise UserError(f"--device cuda: ONNX Runtime could not start CUDA for {path} and fell back to "
                        f"{session.get_providers()[0]} (CUDA 12/13 and cuDNN 9 libraries missing?)")
    return session


@dataclass
class Generation:
    """What one generate() call produced, filled in as it streams."""
    tokens: list[list[int]] = field(default_factory=list)   # new ids, per row
    stop_reason: list[str] = field(default_factory=list)    # "eos", "stop", "length" or "context", per row


class OnnxLM:
    def __init__(self, folder: str | Path, variant: str = "fp32", provider: str = "cpu", threads: int = 0,
                 verify: bool = False, fused: bool | str = False, spin: bool = False):
        """fused: False runs the plain contract graph; True the fused twin (onnxgen fuse);
        "auto" the fused twin when the export has it. spin: let ONNX Runtime's idle threads spin
        (faster only on cores nothing else wants)."""
        from pipeline.fuse import MAX_LEN, fused_path

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"export {self.folder}: folder does not exist")
        path = variant_path(self.folder, variant)
        twin = fused_path(self.folder, variant)
        if fused is True and not twin.is_file():
            raise UserError(f"--fused: {twin} does not exist (make it with: onnxgen fuse {self.folder})")
        # onnxruntime's CUDA GroupQueryAttention has fp16/bf16 kernels only: an fp32 fused graph on CUDA
        # would run its attention on the CPU with the cache copied across each step; "auto" avoids that
        auto_ok = twin.is_file() and not (provider == "cuda" and variant == "fp32")
        self.fused = fused is True or (fused == "auto" and auto_ok)
        path = twin if self.fused else path
        # untrusted files: checked before anything reads them (the graph checked is the one opened)
        preflight(self.folder, variant, provider, verify, path=path)
        self.config = read_json(self.folder / "config.json", "config")
        gen = read_json(self.folder / "generation_config.json", "generation config")
        self.tokenizer = load_tokenizer(self.folder / "tokenizer.json", require_eot=False)  # eos: generation_config
        self.eos_id = first_id(gen["eos_token_id"])
        self.pad_id = int(gen.get("pad_token_id", self.eos_id))
        self.n_ctx = context_length(self.config)
        if not path.is_file():
            raise UserError(f"--variant {variant}: {path} does not exist in this export")
        self.provider = provider
        self.session = make_session(path, provider, threads, spin)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        missing = [n for n in INPUTS if n not in inputs]
        if missing or not self.past_names:
            raise UserError(f"model {path}: not a decoder with KV cache (missing inputs {missing or 'past_key_values.*'})")
        first = inputs[self.past_names[0]]
        _, self.n_kv_heads, past_len, self.head_dim = first.shape  # fixed integers by contract
        if self.fused and past_len != MAX_LEN:
            raise UserError(f"model {path}: not a fused graph of onnxgen fuse (its cache is not a "
                            f"{MAX_LEN} buffer); remake it with: onnxgen fuse {self.folder}")
        self.past_dtype = _ORT_TO_NUMPY[first.type]
        vocab_dim = self.session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab_dim) if isinstance(vocab_dim, int) else int(self.config["vocab_size"])
        vocab = self.tokenizer.get_vocab_size()
        if vocab > int(self.config.get("vocab_size", vocab)):
            raise UserError(f"tokenizer {self.folder / 'tokenizer.json'}: {vocab} tokens, more than the "
                            f"model's vocab_size {self.config['vocab_size']}")

    # ------------------------------------------------------------------ one forward step (plain graph)
    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.past_dtype) for _ in self.past_names]

    def forward(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        assert not self.fused, "forward() follows the plain contract; the fused graph's cache is a shared buffer"
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits, present

    # ------------------------------------------------------------------ the two step loops
    # Each is a generator: it yields last-position logits (B, V) and receives (next ids (B,), done (B,)).
    def _plain_steps(self, prompts: list[list[int]], budget: int):
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, p in enumerate(prompts):  # left padding: the contract graph masks it out
            ids[b, T - len(p):] = p
            mask[b, T - len(p):] = 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        device = "cuda" if self.provider == "cuda" else "cpu"
        io = self.session.io_binding()
        past = self.empty_past(B)  # (B, H, 0, D): bound from NumPy once, ORT's own OrtValues after that
        while True:
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_cpu_input("position_ids", positions)
            for name, value in zip(self.past_names, past):
                if isinstance(value, np.ndarray):
                    io.bind_cpu_input(name, value)
                else:
                    io.bind_ortvalue_input(name, value)
            io.bind_output("logits", "cpu")
            for name in self.present_names:  # presents stay ORT's (on the device): fed back, never copied out
                io.bind_output(name, device)
            self.session.run_with_iobinding(io)
            logits, *past = io.get_outputs()
            nxt, _ = yield logits.numpy()[:, -1, :]
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            ids = nxt[:, None]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)

    def _fused_steps(self, prompts: list[list[int]], budget: int):
        import onnxruntime as ort

        B, T = len(prompts), max(len(p) for p in prompts)
        L = min(self.n_ctx, T + budget)  # the shared buffer's length: every position this call can write
        device = "cuda" if self.provider == "cuda" else "cpu"
        # allocated once: the same OrtValue is past and present, GroupQueryAttention writes in place
        zeros = [np.zeros((B, self.n_kv_heads, L, self.head_dim), dtype=self.past_dtype) for _ in self.past_names]
        cache = [ort.OrtValue.ortvalue_from_numpy(z, device, 0) for z in zeros]
        logits = np.empty((B, 1, self.vocab_size), dtype=np.float32)
        io = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, cache):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)

        # prefill, right-padded: row b's tokens sit in slots [0, len_b)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)  # tokens in the cache, per row
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))))
        self.session.run_with_iobinding(io)
        nxt, done = yield logits[:, 0, :]

        # decode: input_ids and position_ids are (B, 1) from here on, so they are OrtValues made once and
        # updated in place. The mask grows: GroupQueryAttention sizes its score buffer by its width
        # (total_sequence_length), so a max-length mask would cost every step the whole budget.
        step_ids, step_pos = np.empty((B, 1), np.int64), np.empty((B, 1), np.int64)
        values = {name: ort.OrtValue.ortvalue_from_numpy(a, device, 0)
                  for name, a in (("input_ids", step_ids), ("position_ids", step_pos))}
        for name, value in values.items():
            io.bind_ortvalue_input(name, value)
        columns = np.arange(L)
        while True:
            # a finished row feeds a pad into its next slot without advancing: that slot is never read
            slot = np.minimum(lengths, L - 1)
            step_ids[:, 0] = nxt
            step_pos[:, 0] = np.minimum(slot, self.n_ctx - 1)
            values["input_ids"].update_inplace(step_ids)
            values["position_ids"].update_inplace(step_pos)
            io.bind_cpu_input("attention_mask", (columns[:slot.max() + 1] <= slot[:, None]).astype(np.int64))
            self.session.run_with_iobinding(io)
            lengths = np.where(done, lengths, lengths + 1)
            nxt, done = yield logits[:, 0, :]

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
                 result: Generation | None = None, stop: list[str] | None = None) -> Iterator[np.ndarray]:
        """Yields the next ids (B,) at each step; rows stop on their own (eos, a stop string, the context).

        A finished row keeps receiving the pad id so the batch stays rectangular.
        """
        for i, p in enumerate(prompts):
            self.check_prompt(p, f"prompt {i + 1}" if len(prompts) > 1 else "prompt")
        config = sampling or SamplingConfig()
        sampler = Sampler(config)
        result = result if result is not None else Generation()
        B = len(prompts)
        stop = [s for s in (stop or []) if s]
        # a stop string of n characters spans at most 4n byte-level tokens
        stop_window = 4 * max((len(s) for s in stop), default=0)
        seen = None
        if config.repetition_penalty != 1.0:
            seen = np.zeros((B, self.vocab_size), dtype=bool)  # (B, V): tokens in prompt or output
            for b, p in enumerate(prompts):
                seen[b, p] = True
        done = np.zeros(B, dtype=bool)
        result.tokens = [[] for _ in range(B)]
        result.stop_reason = [""] * B
        lengths = np.array([len(p) for p in prompts])
        steps = (self._fused_steps if self.fused else self._plain_steps)(prompts, max_new_tokens)
        logits = next(steps)
        try:
            for step in range(max_new_tokens):
                nxt = sampler(logits, seen)
                nxt = np.where(done, self.pad_id, nxt)
                alive = np.flatnonzero(~done)
                for b in alive:
                    result.tokens[b].append(int(nxt[b]))
                if seen is not None:
                    seen[alive, nxt[alive]] = True
                lengths += ~done
                yield nxt
                finished_now = ~done & (nxt == self.eos_id) if stop_at_eos else np.zeros(B, bool)
                for b in np.flatnonzero(finished_now):
                    result.stop_reason[b] = "eos"
                done |= finished_now
                for b in np.flatnonzero(~done) if stop else ():
                    tail = self.tokenizer.decode(result.tokens[b][-stop_window:])
                    if any(s in tail for s in stop):
                        result.stop_reason[b] = "stop"
                        done[b] = True
                full = ~done & (lengths >= self.n_ctx)
                for b in np.flatnonzero(full):
                    result.stop_reason[b] = "context"
                done |= full
                if done.all() or step == max_new_tokens - 1:
                    break
                logits = steps.send((nxt, done.copy()))
        finally:
            steps.close()
        for b in range(B):
            result.stop_reason[b] = result.stop_reason[b] or "length"

    def complete(self, prompts: list[str], max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 stop: list[str] | None = None, result: Generation | None = None) -> list[str]:
        """Batch text in, one completion per prompt out (cut before a stop string, without the eos)."""
        result = result if result is not None else Generation()
        for _ in self.generate([self.encode(p) for p in prompts], max_new_tokens, sampling, result=result, stop=stop):
            pass
        return [_cut(self.tokenizer.decode([t for t in toks if t != self.eos_id]), stop)
                for toks in result.tokens]

    def stream(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
               result: Generation | None = None, stop: list[str] | None = None) -> Iterator[str]:
        """Text pieces as they are generated (whole UTF-8 characters only; never part of a stop string)."""
        ids = self.encode(prompt)
        decoder = IncrementalDecoder(self.tokenizer)
        text, shown = "", ""
        hold = max((len(s) for s in stop or [] if s), default=1) - 1  # could be the start of a stop string
        for nxt in self.generate([ids], max_new_tokens, sampling, result=result, stop=stop):
            token = int(nxt[0])
            if token == self.eos_id:
                break
            piece = decoder.push(token)
            if piece:
                text += piece
                cut = _cut(text, stop)
                ready = cut[:len(cut) - hold] if hold else cut
                if len(ready) > len(shown):
                    yield ready[len(shown):]
                    shown = ready
        text = _cut(self.tokenizer.decode(decoder.ids), stop)  # and a character cut off at the end
        if text != shown and text.startswith(shown):
            yield text[len(shown):]


class IncrementalDecoder:
    """The text of a growing list of token ids, a piece at a time, whole characters only.

    Decoding everything produced at every step costs more with each token (69 us a step at 1,024);
    this decodes a short window and its prefix and returns the difference, so decoders that treat a
    first token specially (a Metaspace decoder drops its leading space) give what decoding the whole
    list would. ids[prefix:read] is text already returned; ids[read:] is waiting for the rest of a
    multi-byte character. (Written by hand: `tokenizers` has no streaming decoder in its Python API.)"""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return window[len(before):]
        return ""


def _cut(text: str, stop: list[str] | None) -> str:
    """text up to the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop or [] if s) if i >= 0), default=len(text))
    return text[:cut]


def read_prompts(path: Path) -> list[str]:
    """--prompts: one prompt per line, or JSONL ({"prompt": "..."} or a JSON string per line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"--prompts {path}: file does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts {path}: not UTF-8 text") from None
    jsonl = Path(path).suffix == ".jsonl"
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)  # multi-line prompts: use .jsonl
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {path}: line {n} is not JSON ({e.msg})") from None
        text = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(text, str):
            raise UserError(f"--prompts {path}: line {n} has no \"prompt\" string")
        prompts.append(text)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (expected one per line)")
    return prompts
