"""The ONNX Runtime generation loop: an export folder in, tokens out.

    lm = OnnxLM("exports/default", fused="auto")
    for piece in lm.stream("def parse_args(", max_new_tokens=64):
        print(piece, end="", flush=True)

Everything is read from the folder: shapes from the graph, ids from generation_config.json,
the context length from config.json.

Two graph kinds, one step API and one bookkeeping (stops, sampling, per-row state):

    state = lm.start(prompts, budget)     # prefill: state.logits is (B, V) at each row's last token
    state.step(next_ids, done)            # one decode step: state.logits for the next position

  - fused (onnx/*_gqa.onnx, see convert/fuse.py), SharedBufferDecode: one (B, H, max_length, D) OrtValue
    per cache tensor, allocated once per generation and bound as both past and present, so
    GroupQueryAttention appends in place; logits come back (B, 1, V) straight into a NumPy buffer.
    Prompts are right-padded, each row keeps its own length. On CUDA the cache stays on the device.
  - plain (the contract graph, docs/contract.md), PlainDecode: left padding, presents fed back as OrtValues
    through IO binding (no NumPy round trip), the cache grows by Concat inside the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import UserError
from pipeline.exports import (INPUTS, LOGITS_TO_KEEP, MAX_LEN, fused_path, generation_ids, is_state, present_of,
                              read_config, variant_path)
from pipeline.preflight import preflight
from pipeline.run.sampling import Sampler, SamplingConfig
from pipeline.run import speculative
from pipeline.run.speculative import MAX_DRAFT, MAX_DRAFT_QUANTIZED, SpeculationStats
from pipeline.run.text import CompletionText, cut_at_stop
from pipeline.tokenizer import prompt_tokenizer

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def os_zeros(shape, dtype) -> np.ndarray:
    """A zero-filled array in memory mapped straight from the OS, for a KV cache.

    NumPy asks the kernel for transparent huge pages on arrays of 4 MB and more (madvise). Where the
    machine's THP defrag is "madvise" (a common default), the first touch of each 2 MB then waits for the
    kernel to compact memory into a huge page: measured here on SmolLM2, a chat's first prefill into its
    8,192-position cache took 64-1,134 ms that way (four fresh processes) against 51-78 ms from this
    mapping, and committing a server's 1.9 GB cache 0.35-7.0 s against 0.8-1.0 s. An anonymous private
    mapping is zeroed by the kernel, touched page by page where it is written, and never madvised.
    """
    import mmap

    count = int(np.prod(shape))
    size = max(count * np.dtype(dtype).itemsize, 1)
    flags = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # Windows: no flags
    return np.frombuffer(mmap.mmap(-1, size, **flags), dtype=dtype, count=count).reshape(shape)


def require_cuda() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--device cuda: this onnxruntime has no CUDAExecutionProvider "
                        "(install onnxruntime-gpu instead of onnxruntime: make install GPU=1)")


def make_session(path: Path, provider: str = "cpu", threads: int = 0, spin: bool | None = None,
                 prepack: bool = True, arena: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # Spin-waiting: idle intra-op threads spin for the next kernel instead of sleeping (ONNX Runtime's and
    # onnxruntime-genai's default). Measured on this project's 2-core machine with 2 threads, fresh processes
    # side by side (benchmarks/CLI.md): the small preset's fused fp32 graph decodes a token in 0.42 ms spinning
    # against 0.64 ms not, int4 0.22 against 0.32 ms. A spinning thread takes its core from whatever else wants
    # it: an earlier run of ours with six other jobs on these 2 cores measured the small's int4 at 418 tok/s
    # spinning against 1,528 not. So the server, whose event loop needs the other core, passes spin=False,
    # and --threads 1 (no pool at all) is the choice on a busy machine.
    if spin is None:
        spin = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if not prepack:  # no second, pre-packed copy of the fp32 weights (parity: memory over speed)
        options.add_session_config_entry("session.disable_prepacking", "1")
    # arena=False (parity's plain graphs): each run's buffers are freed, not kept in ONNX Runtime's CPU arena. A parity call's
    # logits are hundreds of MB; the arena kept them, and glibc kept 0.6-0.8 GB of SmolLM2's even after the
    # session was gone, under the next graph's peak (benchmarks/MEMORY_NOTES.md)
    options.enable_cpu_mem_arena = arena
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
    speculation: SpeculationStats | None = None             # drafts checked and kept, when it speculated


PREFILL_LOGITS = 64 << 20  # bytes of logits one plain prefill call may return: longer prompts go in chunks


class PlainDecode:
    """Decode state of the plain contract graph: left-padded rows, the cache grows by Concat in the graph.

    Presents stay ONNX Runtime's OrtValues (on the device) and are bound back as the next pasts: no
    NumPy round trip for the cache. The plain graph returns logits for every position it is fed (1 MB a
    token for a 262k vocabulary), so a prompt whose logits would pass PREFILL_LOGITS is prefilled in chunks
    through the cache, and only the last position's are kept."""

    def __init__(self, lm: "OnnxLM", prompts: list[list[int]]):
        self.lm, B, T = lm, len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, T), lm.pad_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, p in enumerate(prompts):  # left padding: the contract graph masks it out
            ids[b, T - len(p):] = p
            mask[b, T - len(p):] = 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        self.device = "cuda" if lm.provider == "cuda" else "cpu"
        self.io = lm.session.io_binding()
        self.past: list = lm.empty_past(B)  # (B, H, 0, D): bound from NumPy once, ORT's own OrtValues after
        chunk = max(16, PREFILL_LOGITS // (B * lm.vocab_size * 4))
        for start in range(0, T, chunk):
            self.ids = np.ascontiguousarray(ids[:, start:start + chunk])
            self.positions = np.ascontiguousarray(positions[:, start:start + chunk])
            self.mask = np.ascontiguousarray(mask[:, :start + chunk])
            self.logits = self._run()

    def _run(self) -> np.ndarray:
        io, lm = self.io, self.lm
        io.bind_cpu_input("input_ids", self.ids)
        io.bind_cpu_input("attention_mask", self.mask)
        io.bind_cpu_input("position_ids", self.positions)
        for name, value in zip(lm.past_names, self.past):
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in lm.present_names:
            io.bind_output(name, self.device)
        lm.session.run_with_iobinding(io)
        self._logits, *self.past = io.get_outputs()  # kept: the array below may view its buffer
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        return self._logits.numpy()[:, -1, :]

    @property
    def can_extend(self) -> bool:
        return not self.lm.has_state  # a state cannot be cut back to a length (run/speculative.py)

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Feed (B, n) more ids after each row's; returns the logits (B, n, V) at every one of them."""
        n = ids.shape[1]
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.positions = self.positions[:, -1:] + np.arange(1, n + 1)
        self.mask = np.concatenate([self.mask, np.ones(ids.shape, dtype=np.int64)], axis=1)
        self.logits = self._run()
        return self._logits.numpy()

    def keep(self, n_keep: int) -> None:
        """Of the ids the last extend() fed, keep the first n_keep in the cache (the same for every row)."""
        self.drop(self.ids.shape[1] - n_keep)

    def drop(self, n: int) -> None:
        """Forget the last n tokens of every row's cache."""
        if n:
            # presents are ONNX Runtime's OrtValues: cut (a copy) and bound from NumPy next call
            self.past = [np.ascontiguousarray(p.numpy()[:, :, :-n]) for p in self.past]
            self.mask = self.mask[:, :-n]
            self.positions = self.positions[:, -1:] - n

    def step(self, nxt: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Feed next ids (B,); returns the logits (B, V) that follow them."""
        B = len(nxt)
        self.ids = np.asarray(nxt, dtype=np.int64)[:, None]
        self.positions = self.positions[:, -1:] + 1
        self.mask = np.concatenate([self.mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        self.logits = self._run()
        return self.logits


def bind_shared_cache(io, lm: "OnnxLM", values: list, logits: np.ndarray) -> None:
    """The fused graph's cache and logits: each cache OrtValue bound as both past and present, so
    GroupQueryAttention appends in place, and the logits written straight into `logits` (B, 1, V)."""
    for past, present, value in zip(lm.past_names, lm.present_names, values):
        io.bind_ortvalue_input(past, value)
        io.bind_ortvalue_output(present, value)
    io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)


def bind_prefill(io, ids: np.ndarray, lengths: np.ndarray) -> None:
    """The fused graph's prompt feed: (B, T) right-padded ids that start at slot 0 of each row's cache,
    each row masked to its length, positions 0..T-1."""
    B, T = ids.shape
    io.bind_cpu_input("input_ids", ids)
    io.bind_cpu_input("attention_mask", (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64))
    io.bind_cpu_input("position_ids", np.ascontiguousarray(np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))))


def bind_continued(io, new: np.ndarray, lengths: np.ndarray) -> None:
    """The fused graph's feed for more prompt tokens after what each row holds (a chat's next turn, a prompt
    after a cached prefix): new (B, S) ids at positions lengths..lengths+S-1, the mask over all of them."""
    total = lengths + new.shape[1]
    io.bind_cpu_input("input_ids", new)
    io.bind_cpu_input("attention_mask", (np.arange(total.max())[None, :] < total[:, None]).astype(np.int64))
    io.bind_cpu_input("position_ids", lengths[:, None] + np.arange(new.shape[1], dtype=np.int64))


class SharedBufferDecode:
    """Decode state of the fused graph: one (B, H, L, D) OrtValue per cache tensor, allocated once and
    bound as both past and present, so GroupQueryAttention appends in place. Prompts are right-padded;
    each row keeps its own length. Logits come back (B, 1, V) straight into a NumPy buffer."""

    def __init__(self, lm: "OnnxLM", prompts: list[list[int]], budget: int):
        import onnxruntime as ort

        self.lm, B, T = lm, len(prompts), max(len(p) for p in prompts)
        self.L = L = min(lm.n_ctx, T + budget)  # the buffer's length: every position this call can write
        device = "cuda" if lm.provider == "cuda" else "cpu"
        zeros = lm.empty_past(B, L, os_zeros)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(z, device, 0) for z in zeros]
        self.out = np.empty((B, 1, lm.vocab_size), dtype=np.float32)
        io = self.io = lm.session.io_binding()
        bind_shared_cache(io, lm, self.cache, self.out)

        # prefill, right-padded: row b's tokens sit in slots [0, len_b)
        self.lengths = np.array([len(p) for p in prompts], dtype=np.int64)  # tokens in the cache, per row
        ids = np.full((B, T), lm.pad_id, dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        if lm.has_state and B > 1:
            self._prefill_rows(ids, zeros, device)
        else:
            bind_prefill(io, ids, self.lengths)
            lm.session.run_with_iobinding(io)
        self.logits = self.out[:, 0, :]

        # decode: input_ids and position_ids are (B, 1) from here on, so they are OrtValues made once and
        # updated in place. The mask grows: GroupQueryAttention sizes its score buffer by its width
        # (total_sequence_length), so a max-length mask would cost every step the whole budget.
        # On the CPU an OrtValue made from a NumPy array is that array's memory: writing the array is enough.
        self.step_ids, self.step_pos = np.empty((B, 1), np.int64), np.empty((B, 1), np.int64)
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(a, device, 0)
                       for name, a in (("input_ids", self.step_ids), ("position_ids", self.step_pos))}
        self.copy_inputs = device != "cpu"
        self._bind_step_inputs()
        self.columns = np.arange(L)
        # one row has no padding: its mask is all ones, a prefix of this row (B > 1 builds it per step)
        self.ones = np.ones((1, L), np.int64) if B == 1 else None

    def _prefill_rows(self, ids: np.ndarray, zeros: list[np.ndarray], device: str) -> None:
        """A model with state (LFM2's conv layers) takes a batch's prompts one row at a time: a state holds
        the last inputs of its row, and in a right-padded prefill a shorter row's would be its padding.
        Each row runs alone on its own rows of the batch's buffers (on the CPU an OrtValue of a NumPy view
        is that memory), so the decode steps after go on from every row's own state."""
        import onnxruntime as ort

        if device != "cpu":
            raise UserError("a fused graph with state (LFM2) on CUDA takes one prompt at a time here; "
                            "pass one prompt, or run the plain graph")
        for b, n in enumerate(self.lengths.tolist()):
            io = self.lm.session.io_binding()
            bind_shared_cache(io, self.lm, [ort.OrtValue.ortvalue_from_numpy(z[b:b + 1], device, 0) for z in zeros],
                              self.out[b:b + 1])
            bind_prefill(io, np.ascontiguousarray(ids[b:b + 1, :n]), self.lengths[b:b + 1])
            self.lm.session.run_with_iobinding(io)

    def _bind_step_inputs(self) -> None:
        for name, value in self.values.items():
            self.io.bind_ortvalue_input(name, value)

    @property
    def can_extend(self) -> bool:
        """GroupQueryAttention takes several new tokens after a past for one row only, and a state cannot be cut
        back to a length; a twin from before logits_to_keep returns one position's logits."""
        return len(self.lengths) == 1 and not self.lm.has_state and self.lm.keeps_logits

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Feed (1, n) more ids after the row's; returns the logits (1, n, V) at every one of them (the
        fused graph's logits_to_keep input: its LM head runs on those n positions only)."""
        import onnxruntime as ort

        n = ids.shape[1]
        assert self.can_extend and (self.lengths + n <= self.L).all(), "extend: one row, within the buffer"
        io = self.io
        # ONNX Runtime allocates these logits: the twin declares (B, 1, V), the default's shape, which
        # onnxruntime-genai sizes its buffer by, and a caller's (1, n, V) buffer would be refused against it
        io.bind_output("logits", "cpu")
        # an overridable initializer: ORT binds it as an OrtValue (bind_cpu_input looks among the inputs only)
        io.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array(n, dtype=np.int64)))
        bind_continued(io, np.ascontiguousarray(ids, dtype=np.int64), self.lengths)
        self.lm.session.run_with_iobinding(io)
        out = next(v for v in io.get_outputs() if len(v.shape()) == 3).numpy()  # (the presents are 4-D)
        self.lengths = self.lengths + n
        self.fed = n
        io.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64)))
        io.bind_output("logits", "cpu", 0, np.float32, list(self.out.shape), self.out.ctypes.data)
        self._bind_step_inputs()  # back to the (B, 1) OrtValues that step() updates in place
        return out

    def keep(self, n_keep: int) -> None:
        """Of the ids the last extend() fed, keep the first n_keep: slots past the length are never read."""
        self.drop(self.fed - n_keep)

    def drop(self, n: int) -> None:
        """Forget the last n tokens of the row's cache."""
        self.lengths = self.lengths - n

    def rewind(self, lengths) -> None:
        """Forget each row's tokens past lengths[b]: the next append or step writes from there (slots beyond a
        row's length are never read, so nothing is cleared)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        assert lengths.shape == self.lengths.shape and (lengths <= self.lengths).all() and (lengths >= 1).all()
        # a state (LFM2's conv layers) holds what every token did to it: it cannot go back (run/chat.py
        # prefills afresh instead)
        assert not self.lm.has_state or (lengths == self.lengths).all(), "a model with state cannot rewind"
        self.lengths = lengths

    def append(self, new: list[list[int]]) -> np.ndarray:
        """Prefill more tokens after what the row holds (a chat's next turn). One row only: onnxruntime's
        GroupQueryAttention takes a continued prompt (past and S > 1 new tokens) for batch 1 alone ("batch_size
        must be 1 when sequence_length > 1 and past context is given"). Returns the logits (1, V) after the
        last new token."""
        S = len(new[0])
        assert len(self.lengths) == 1 and len(new) == 1 and S >= 1, "append: one row, at least one token"
        if (self.lengths + S > self.L).any():
            raise UserError(f"append: {S} more tokens do not fit the {self.L}-token buffer")
        bind_continued(self.io, np.asarray(new, dtype=np.int64), self.lengths)
        self.lm.session.run_with_iobinding(self.io)
        self.lengths = self.lengths + S
        self._bind_step_inputs()  # back to the (B, 1) OrtValues that step() updates in place
        return self.logits

    def step(self, nxt: np.ndarray, done: np.ndarray) -> np.ndarray:
        """Feed next ids (B,); rows marked done take the id into a slot that is never read and do not
        advance. Returns the logits (B, V) that follow."""
        if self.ones is not None:  # one row (the CLI, a chat): the same in Python ints, cheaper than NumPy calls
            slot = min(int(self.lengths[0]), self.L - 1)
            self.step_ids[0, 0], self.step_pos[0, 0] = nxt[0], min(slot, self.lm.n_ctx - 1)
            mask = self.ones[:, :slot + 1]
        else:
            slot = np.minimum(self.lengths, self.L - 1)
            self.step_ids[:, 0] = nxt
            self.step_pos[:, 0] = np.minimum(slot, self.lm.n_ctx - 1)
            mask = (self.columns[:slot.max() + 1] <= slot[:, None]).astype(np.int64)
        if self.copy_inputs:
            self.values["input_ids"].update_inplace(self.step_ids)
            self.values["position_ids"].update_inplace(self.step_pos)
        self.io.bind_cpu_input("attention_mask", mask)
        self.lm.session.run_with_iobinding(self.io)
        self.lengths = np.where(done, self.lengths, self.lengths + 1)
        return self.logits


class OnnxLM:
    def __init__(self, folder: str | Path, variant: str = "fp32", provider: str = "cpu", threads: int = 0,
                 verify: bool = False, fused: bool | str = False, spin: bool | None = None,
                 special_tokens: bool = True, prepack: bool = True, arena: bool = True):
        """fused: False runs the plain contract graph; True the fused twin (onnxgen fuse);
        "auto" the fused twin when the export has it. spin: let ONNX Runtime's idle threads spin
        (faster only on cores nothing else wants); None: ONNX Runtime's default, spinning.
        special_tokens: text prompts get the special tokens transformers' tokenizer adds (a BOS where the
        folder declares one: tokenizer.prompt_tokenizer); False encodes the bare text (raw continuations).
        prepack, arena: ONNX Runtime's pre-packed weights and CPU memory arena (make_session); parity turns
        prepack off for float graphs and the arena off for plain graphs, for memory (check/parity.open_graphs)."""
        self.folder = Path(folder)
        self.verify = verify  # the chat template's files are checked when a chat reads them (run/chat.py)
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
        self.variant = variant
        path = twin if self.fused else path
        # untrusted files: checked before anything reads them (the graph checked is the one opened)
        preflight(self.folder, variant, provider, verify, path=path)
        self.shape = read_config(self.folder)
        ids = generation_ids(self.folder)
        self.tokenizer = prompt_tokenizer(self.folder)  # eos ids: generation_config.json
        self.special_tokens = special_tokens
        self.eos_ids = np.array(ids.eos, dtype=np.int64)
        self.eos_id, self.pad_id = ids.eos[0], ids.pad
        self.sampling_defaults = ids.sampling  # generation_config.json's do_sample, temperature, ...
        self.n_ctx = self.shape.context
        if not path.is_file():
            raise UserError(f"--variant {variant}: {path} does not exist in this export")
        self.provider = provider
        self.session = make_session(path, provider, threads, spin, prepack, arena)
        inputs = {i.name: i for i in self.session.get_inputs()}
        # the cache in the graph's order: K/V (past_key_values.*) and, in a hybrid model, fixed-size state
        # (LFM2's past_conv.*, docs/contract.md part 3), each fed back from its present
        self.past_names = [n for n in inputs if n.startswith("past_key_values.") or is_state(n)]
        self.present_names = [present_of(n) for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in INPUTS if n not in inputs] + [n for n in self.present_names if n not in outputs]
        kv = [n for n in self.past_names if not is_state(n)]
        if missing or not kv:
            raise UserError(f"model {path}: not a decoder with KV cache (missing {missing or 'past_key_values.*'})")
        # a state's dims but batch are fixed integers by contract; it is zeros before the first token
        self.state_shapes = {n: tuple(inputs[n].shape[1:]) for n in self.past_names if is_state(n)}
        self.has_state = bool(self.state_shapes)
        # a check of n tokens gives one token's logits only where the weights' kernels compute each row as alone:
        # float MatMul does (fp32: ~5e-6 apart); int4's MatMulNBits does not (a 10-token check of SmolLM2 is
        # 0.15 median |Δlogit| from 10 steps) nor int8's dynamic per-tensor quantization, so speculation is
        # on by default for fp32 only (run/speculative.py)
        self.exact_checks = variant == "fp32"
        self.max_draft = MAX_DRAFT if variant in ("fp32", "fp16") else MAX_DRAFT_QUANTIZED
        # a fused twin made since speculative decoding came in returns the logits of n positions on request
        self.keeps_logits = self.fused and any(i.name == LOGITS_TO_KEEP
                                               for i in self.session.get_overridable_initializers())
        first = inputs[kv[0]]
        _, self.n_kv_heads, past_len, self.head_dim = first.shape  # fixed integers by contract
        if self.fused and past_len != MAX_LEN:
            raise UserError(f"model {path}: not a fused graph of onnxgen fuse (its cache is not a "
                            f"{MAX_LEN} buffer); remake it with: onnxgen fuse {self.folder}")
        self.past_dtype = _ORT_TO_NUMPY[first.type]
        self.past_dtypes = {n: _ORT_TO_NUMPY[inputs[n].type] for n in self.past_names}  # states stay fp32
        vocab_dim = self.session.get_outputs()[0].shape[-1]
        self.vocab_size = int(vocab_dim) if isinstance(vocab_dim, int) else self.shape.vocab
        vocab = self.tokenizer.get_vocab_size()
        if vocab > self.shape.vocab:
            raise UserError(f"tokenizer {self.folder / 'tokenizer.json'}: {vocab} tokens, more than the "
                            f"model's vocab_size {self.shape.vocab}")

    # ------------------------------------------------------------------ the step API
    def empty_past(self, batch: int, length: int = 0, zeros=np.zeros) -> list[np.ndarray]:
        """The cache before the first token, in past_names' order: K/V of `length` positions (0 for the plain
        graph, the shared buffer's length for the fused one) and each state's zeros."""
        return [zeros((batch, *self.state_shapes[n]) if n in self.state_shapes else
                      (batch, self.n_kv_heads, length, self.head_dim), self.past_dtypes[n]) for n in self.past_names]

    def forward(self, input_ids, attention_mask, position_ids, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the plain contract graph, NumPy in and out (parity drives it like the PyTorch model)."""
        assert not self.fused, "forward() follows the plain contract; the fused graph's cache is a shared buffer"
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits, present

    def start(self, prompts: list[list[int]], budget: int) -> PlainDecode | SharedBufferDecode:
        """Prefill `prompts` (token ids, any lengths) with room for `budget` more tokens per row; the
        returned state has .logits (B, V) at each row's last token and .step(next_ids, done)."""
        return SharedBufferDecode(self, prompts, budget) if self.fused else PlainDecode(self, prompts)

    # ------------------------------------------------------------------ the loop
    def guides(self, constraint, batch: int):
        """The matchers of a batch's constrained rows (run/guidance.py), or None when no row has a constraint."""
        rows = constraint if isinstance(constraint, (list, tuple)) else [constraint] * batch
        assert len(rows) == batch, "one constraint (or None) per prompt"
        if all(c is None for c in rows):
            return None
        from pipeline.run.guidance import Guides, guidance_tokenizer

        guides = Guides(guidance_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids.tolist()), batch,
                        self.vocab_size)
        for b, c in enumerate(rows):
            if c is not None:
                guides.add(b, c)
        return guides

    def encode(self, text: str) -> list[int]:
        """A text prompt's ids, as transformers' tokenizer encodes it (unless special_tokens is off)."""
        return self.tokenizer.encode(text, add_special_tokens=self.special_tokens).ids

    def check_prompt(self, ids: list[int], label: str = "prompt") -> None:
        if not ids:
            raise UserError(f"{label}: empty (expected at least one token)")
        if len(ids) >= self.n_ctx:
            raise UserError(f"{label}: {len(ids)} tokens, but the model's context is {self.n_ctx} "
                            f"(at most {self.n_ctx - 1} leaves room for one new token)")

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64,
                 sampling: SamplingConfig | None = None, stop_at_eos: bool = True,
                 result: Generation | None = None, stop: list[str] | None = None,
                 constraint=None, speculate: bool | None = None, draft: "OnnxLM | None" = None) -> Iterator[np.ndarray]:
        """Yields the next ids (B,) at each step; rows stop on their own (eos, a stop string, the context).

        A finished row keeps receiving the pad id so the batch stays rectangular. constraint: a
        guidance.Constraint for every row, or a list of one (or None) per row: each such row's picks are
        masked to its grammar (run/guidance.py). speculate: check prompt-lookup drafts several tokens a call
        (run/speculative.py); None (the default) where it cannot change the output: greedy on fp32; True also
        when sampling (the same distribution, other draws) and on quantized graphs (their kernels compute a
        multi-token check with other rounding, so greedy tokens can differ where logits nearly tie). A
        constraint masks each checked position as its matcher stands after the drafts before it. Off where the
        graph cannot take several tokens after a cache (a state, a fused batch). draft: a smaller export with
        the same tokenizer whose greedy tokens are the drafts instead (on whenever given, unless speculate is
        False).
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
        # eos by table lookup: np.isin costs ~20 us a step, a step of the small preset's int4 graph ~200 us
        is_eos = np.zeros(max(self.vocab_size, self.pad_id + 1, int(self.eos_ids.max(initial=0)) + 1), dtype=bool)
        is_eos[self.eos_ids] = stop_at_eos
        guides = self.guides(constraint, B)  # None without a constraint: the loop below is unchanged
        state = self.start(prompts, max_new_tokens)
        logits = state.logits
        spec = speculative.start(self, state, prompts, max_new_tokens, config.greedy, speculate, draft)
        result.speculation = spec and spec.stats
        # Python's work between two steps runs cold (a step streams the weights through the caches), so while
        # no row is done (always, for one row) the masks by `done` are skipped: the same results, fewer calls
        n_done, everyone = 0, np.arange(B)
        for step in range(max_new_tokens):
            if spec is not None and spec.queue:  # chosen by a check of drafts
                nxt = spec.queue.pop(0)
            else:
                if guides is not None:
                    logits = guides.apply(logits)
                nxt = sampler(logits, seen)
            if n_done:
                nxt = np.where(done, self.pad_id, nxt)
            alive = np.flatnonzero(~done) if n_done else everyone
            ids = nxt.tolist()
            for b in alive.tolist():
                result.tokens[b].append(ids[b])
            if seen is not None:
                seen[alive, nxt[alive]] = True
            lengths[alive] += 1
            yield nxt
            finished_now = is_eos[nxt] & ~done if n_done else is_eos[nxt]
            if finished_now.any():
                for b in np.flatnonzero(finished_now):
                    result.stop_reason[b] = "eos"
                done |= finished_now
            for b in np.flatnonzero(~done) if stop else ():
                tail = self.tokenizer.decode(result.tokens[b][-stop_window:])
                if any(s in tail for s in stop):
                    result.stop_reason[b] = "stop"
                    done[b] = True
            if lengths.max() >= self.n_ctx:
                full = ~done & (lengths >= self.n_ctx)
                for b in np.flatnonzero(full):
                    result.stop_reason[b] = "context"
                done |= full
            n_done = int(done.sum())
            if n_done == B or step == max_new_tokens - 1:
                break
            if guides is not None:  # the picks join their matchers; the next masks overlap the next step
                for b in alive.tolist():
                    if done[b]:
                        guides.remove(b)
                    else:
                        guides.consume(b, ids[b])
                guides.prefetch()
            # drafts within the tokens still to come and the model's context
            if spec is not None and spec.after(state, sampler, nxt, done, min(max_new_tokens - step - 2,
                                               self.n_ctx - 1 - int(lengths.max())), seen, guides):
                continue  # the next tokens were chosen by a check of drafts
            logits = state.step(nxt, done)
        for b in range(B):
            result.stop_reason[b] = result.stop_reason[b] or "length"

    def complete(self, prompts: list[str], max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
                 stop: list[str] | None = None, result: Generation | None = None, constraint=None,
                 speculate: bool | None = None, draft: "OnnxLM | None" = None) -> list[str]:
        """Batch text in, one completion per prompt out (cut before a stop string, without the eos)."""
        result = result if result is not None else Generation()
        for _ in self.generate([self.encode(p) for p in prompts], max_new_tokens, sampling, result=result, stop=stop,
                               constraint=constraint, speculate=speculate, draft=draft):
            pass
        return [cut_at_stop(self.tokenizer.decode([t for t in toks if t not in self.eos_ids]), stop)
                for toks in result.tokens]

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
               result: Generation | None = None, stop: list[str] | None = None, constraint=None,
               speculate: bool | None = None, draft: "OnnxLM | None" = None) -> Iterator[str]:
        """Text pieces as they are generated (whole UTF-8 characters only; never part of a stop string).
        prompt: text, or token ids (a rendered chat). constraint: a guidance.Constraint the text must match."""
        ids = prompt if isinstance(prompt, list) else self.encode(prompt)
        text = CompletionText(self.tokenizer, stop)
        eos = set(self.eos_ids.tolist())
        for nxt in self.generate([ids], max_new_tokens, sampling, result=result, stop=stop, constraint=constraint,
                                 speculate=speculate, draft=draft):
            token = int(nxt[0])
            if token in eos:
                break
            piece = text.push(token)
            if piece:
                yield piece
        rest = text.finish()  # held-back characters, and a character cut off at the end
        if rest:
            yield rest
