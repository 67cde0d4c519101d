"""Continuous batching over the fused graph: requests join the running batch between decode steps and
leave it when they finish, each row with its own length.

    engine = BatchEngine(lm, capacity=16, max_waiting=64)   # lm: an OnnxLM on a fused graph
    engine.start()
    engine.submit(Request(prompt_ids, max_tokens, sampling, stop, emit=callback))  # False: queue full
    engine.cancel(request)                                   # a client went away: its row is freed

The cache is one (capacity, H, L, D) NumPy array per cache tensor, and each request owns a row of it (a
slot). L is the model's context, or less where the memory given to the cache (kv_context) holds less: a
real model's full context is large (SmolLM2: 8,192 positions, 377 MB a row, 24 GB for 64 rows). The arrays
are written once at start, so their memory is committed (and the server's footprint known) then. They come
from lm.os_zeros: in NumPy's memory, advised for huge pages, a row touched for the first time cost its
request 2.5-3.4 s (SmolLM2), each 2 MB waiting on the kernel's compaction.
  - a newcomer is prefilled alone: its row's slice (1, H, L, D) is bound as past and present, so
    GroupQueryAttention's first-prompt path writes its keys straight into the shared array, no copy.
    Alone, because onnxruntime's GroupQueryAttention continues a prompt only at batch 1, and because a
    request must get exactly what it gets run by itself (a padded batch prefill is not bit-identical);
  - with prefix caching on (prefix_cache_bytes > 0, run/prefix_cache.py), a newcomer's prompt is first looked up
    in blocks of prefix_block tokens: the K/V of its longest cached prefix are copied into its row, and only the
    rest is prefilled, as a continued prompt at batch 1 (SharedBufferDecode.append's feed: positions past..T-1,
    the mask over all T). The last token is always prefilled, even when the whole prompt is cached: its logits
    pick the first new token. After the prefill, the prompt's whole blocks that the cache lacks are copied out
    of the row. Copies, not shared pages: a row is one contiguous (H, L, D) slice that GroupQueryAttention
    writes in place, so a block cannot be mapped into several rows; a 64-token block of SmolLM2-135M is 2.9 MB,
    copied either way in about 0.3 ms here (warm pages), against ~140 ms to prefill 64 tokens of it in fp32
    (1.5 s for 512; benchmarks/PREFIX_CACHE.md has the served numbers).
    The decode step never looks at the prefix cache. Only attention K/V are cached: a recurrent state (a future
    hybrid family's Mamba or linear-attention layers) summarises the whole prefix in one tensor that the next
    token overwrites, so it cannot be cut out of a row after the fact; caching it would mean a snapshot of the
    state taken during the prefill at each block boundary (the prompt prefilled block by block, each block's
    end state stored with that block's K/V), and restoring the deepest snapshot found. LFM2's conv state is
    such a state: for it the engine turns prefix caching off (a newcomer always prefills its whole prompt),
    and a newcomer's state row is zeroed before its prefill (the slot's last request left its own there);
  - a decode step runs rows [0, hi) as one batch, hi being one past the highest slot in use; a free
    slot inside that range takes a pad token into its own slot 0, which nothing reads;
  - each request samples with its own Sampler (its temperature, top_p and seed), so its tokens are
    the ones it gets alone, whoever shares the batch (sample_rows: each row by its own Sampler);
  - a request with a constraint (guidance.Constraint) has its own matcher, keyed by its slot: its row's
    logits are masked before the pick, and the masks of the next step are computed while it runs.
Everything runs on one engine thread (ONNX Runtime releases the GIL while it computes). Results go out
once per phase (after the newcomers' prefills, after a decode step) as one list to `deliver` (the server
hands it to its event loop in one call), or to each request's `emit` callback on the engine thread. An
error in one request's sampling or text fails that request only; an error in a batch step fails the
requests of that step, not the engine.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.run.lm import bind_continued, bind_prefill, bind_shared_cache, os_zeros
from pipeline.run.prefix_cache import PrefixCache
from pipeline.run.sampling import Sampler, SamplingConfig, sample_rows
from pipeline.run.text import CompletionText

log = logging.getLogger(__name__)


def kv_context(lm, capacity: int, budget_bytes: float) -> int:
    """The positions per row that `capacity` rows of the KV cache hold in `budget_bytes`, at most the
    model's context; 0 when not even one position fits."""
    kv = [n for n in lm.past_names if n not in lm.state_shapes]
    per_position = len(kv) * lm.n_kv_heads * lm.head_dim * np.dtype(lm.past_dtype).itemsize
    # a state (LFM2's conv layers) takes a fixed size per row, whatever the row's length
    per_row = sum(int(np.prod(shape)) * np.dtype(lm.past_dtypes[n]).itemsize for n, shape in lm.state_shapes.items())
    return int(max(0, min(lm.n_ctx, (budget_bytes - capacity * per_row) // (capacity * per_position))))


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig
    emit: Callable[[str, object], None]    # ("text", piece), ("done", finish_reason) or ("error", message)
    stop: list[str] = field(default_factory=list)
    stop_ids: tuple[int, ...] = ()         # ends the answer besides the export's eos ids (a template's eos)
    constraint: object = None              # a guidance.Constraint the answer must match, or None
    # the engine's bookkeeping
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    length: int = 0                        # tokens in this row's cache
    cached: int = 0                        # prompt tokens copied from the prefix cache, not prefilled
    next_id: int = 0                       # sampled, to be fed at the next step
    finish_reason: str = ""
    cancelled: bool = False
    submitted: float = 0.0
    first_token: float = 0.0


class BatchEngine:
    def __init__(self, lm, capacity: int = 16, max_waiting: int = 64,
                 deliver: Callable[[list[tuple[Request, str, object]]], None] | None = None,
                 context: int | None = None, prefix_cache_bytes: float = 0, prefix_block: int = 64):
        """prefix_cache_bytes: memory for the K/V of prompt prefixes already computed (PrefixCache, in blocks
        of prefix_block tokens); 0 turns prefix caching off."""
        import onnxruntime as ort

        assert lm.fused, "continuous batching needs the fused graph (onnxgen fuse)"
        self.lm, self.capacity, self.max_waiting = lm, capacity, max_waiting
        self.L = lm.n_ctx if context is None else min(context, lm.n_ctx)  # positions a request may use
        self.cache = lm.empty_past(capacity, self.L, os_zeros)  # rows are slots: K/V (H, L, D), states their own
        self.states = [a for a, n in zip(self.cache, lm.past_names) if n in lm.state_shapes]
        for a in self.cache:
            a.fill(0)  # commit the pages now, not in some request's prefill
        self.out = os_zeros((capacity, 1, lm.vocab_size), np.float32)  # 12.6 MB for 64 rows of SmolLM2
        self.rows: list[Request | None] = [None] * capacity
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.ort = ort
        self._decode_io: dict[int, object] = {}  # hi -> an IO binding of rows [0, hi)
        self._row_io: dict[int, object] = {}     # slot -> an IO binding of that row alone
        self.deliver = deliver or (lambda events: [r.emit(kind, data) for r, kind, data in events])
        self.outbox: list[tuple[Request, str, object]] = []
        self.thread = threading.Thread(target=self._loop, name="onnxgen-batch", daemon=True)
        self.steps = 0
        self.guides = None  # guidance.Guides, made by the first request with a constraint
        if prefix_cache_bytes and lm.has_state:
            log.warning("prefix caching is off: %s carries state (LFM2's conv layers) that cannot be cut at a "
                        "prefix (module docstring)", lm.folder)
            prefix_cache_bytes = 0
        self.prefix = PrefixCache(lm, prefix_cache_bytes, min(prefix_block, self.L)) if prefix_cache_bytes else None

    # ------------------------------------------------------------------ the caller's side (any thread)
    def start(self) -> "BatchEngine":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> bool:
        """Queue a request; False when the batch and the queue are full (the server answers 429)."""
        with self.cond:
            busy = sum(r is not None for r in self.rows) + len(self.waiting)
            if busy >= self.capacity + self.max_waiting:
                return False
            request.submitted = time.perf_counter()
            self.waiting.append(request)
            self.cond.notify()
        return True

    def cancel(self, request: Request) -> None:
        """The client went away: the request leaves the batch before the next step."""
        with self.cond:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            load = {"running": sum(r is not None for r in self.rows), "waiting": len(self.waiting)}
        if self.prefix is not None:
            load["prefix_cache"] = self.prefix.stats()
        return load

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and all(r is None for r in self.rows):
                    self.cond.wait()
                if self.stopping:
                    break
                free = [s for s, r in enumerate(self.rows) if r is None]
                newcomers = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
                for r, slot in zip(newcomers, free):
                    r.slot, self.rows[slot] = slot, r
            for r in newcomers:
                self._guard([r], self._admit, r)
            self._flush()
            for r in self.rows:
                if r is not None and r.cancelled:
                    self._release(r)
            if any(r is not None for r in self.rows):
                self._guard([r for r in self.rows if r is not None], self._decode)
            self._flush()
        for r in [*self.rows, *self.waiting]:
            if r is not None:
                self._fail(r, "the server is shutting down")
        self._flush()

    def _send(self, r: Request, kind: str, data) -> None:
        self.outbox.append((r, kind, data))

    def _flush(self) -> None:
        events, self.outbox = self.outbox, []
        if events:
            try:
                self.deliver(events)
            except Exception:  # noqa: BLE001: a receiver that is gone (its loop closed) must not stop the engine
                log.exception("delivering results failed")

    def _guard(self, requests: list[Request], fn, *args) -> None:
        """Run one engine action; if it raises, only the requests it was working for fail."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001: a bug must not take the other requests or the engine down
            log.exception("batch step failed")
            for r in requests:
                if r.slot >= 0 and self.rows[r.slot] is r:
                    self._fail(r, f"internal error: {type(e).__name__}: {e}")

    def _bind_rows(self, io, lo: int, hi: int) -> None:
        views = [self.ort.OrtValue.ortvalue_from_numpy(a[lo:hi], "cpu", 0) for a in self.cache]  # no copy
        bind_shared_cache(io, self.lm, views, self.out[lo:hi])

    def _admit(self, r: Request) -> None:
        """Prefill the newcomer alone into its row (after the prefix the prefix cache holds of it, if any),
        then sample its first token."""
        if r.cancelled:
            self._release(r)
            return
        io, T = self._row_io.get(r.slot), len(r.prompt)
        if io is None:
            io = self._row_io[r.slot] = self.lm.session.io_binding()
            self._bind_rows(io, r.slot, r.slot + 1)
        for a in self.states:  # the slot's last request left its state there: a prompt starts from zeros
            a[r.slot] = 0
        rows = [a[r.slot] for a in self.cache] if self.prefix is not None else None  # (H, L, D) views
        # the last token is always prefilled: its logits pick the first new token
        past = self.prefix.copy_into(r.prompt, rows, T - 1) if rows is not None else 0
        if past:  # a continued prompt, as SharedBufferDecode.append: positions past..T-1 after the copied K/V
            bind_continued(io, np.asarray([r.prompt[past:]], dtype=np.int64), np.array([past]))
        else:
            bind_prefill(io, np.asarray([r.prompt], dtype=np.int64), np.array([T]))
        self.lm.session.run_with_iobinding(io)
        r.length, r.cached = T, past
        if rows is not None:
            self.prefix.store(r.prompt, rows)
        r.sampler, r.text = Sampler(r.sampling), CompletionText(self.lm.tokenizer, r.stop)
        r.eos = set(int(i) for i in self.lm.eos_ids) | set(r.stop_ids)
        if r.constraint is not None:
            self._guide(r)
        self._sample([r])

    def _guide(self, r: Request) -> None:
        """A matcher for the request's row; it ends on any of the request's end tokens."""
        from pipeline.run.guidance import Guides, guidance_tokenizer

        tokenizer = guidance_tokenizer(self.lm.tokenizer, self.lm.vocab_size, r.eos)
        if self.guides is None:
            self.guides = Guides(tokenizer, self.capacity, self.lm.vocab_size)
        self.guides.add(r.slot, r.constraint, tokenizer)

    def _decode(self) -> None:
        """One step of every running row."""
        active = [r for r in self.rows if r is not None]
        hi = max(r.slot for r in active) + 1
        io = self._decode_io.get(hi)
        if io is None:
            io = self._decode_io[hi] = self.lm.session.io_binding()
            self._bind_rows(io, 0, hi)
        ids = np.full((hi, 1), self.lm.pad_id, dtype=np.int64)
        pos = np.zeros((hi, 1), dtype=np.int64)
        width = max(r.length for r in active) + 1
        mask = np.zeros((hi, width), dtype=np.int64)
        mask[:, 0] = 1  # a free slot: one token, written at its slot 0, never read
        for r in active:
            ids[r.slot, 0], pos[r.slot, 0] = r.next_id, r.length
            mask[r.slot, :r.length + 1] = 1
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        if self.guides:
            self.guides.prefetch()  # the constrained rows' next masks, while ONNX Runtime runs the step
        self.lm.session.run_with_iobinding(io)
        self.steps += 1
        for r in active:
            r.length += 1
        self._sample(active)

    def _sample(self, rows: list[Request]) -> None:
        for r in rows:
            if r.cancelled:
                self._release(r)
        rows = [r for r in rows if not r.cancelled]
        slots = [r.slot for r in rows]
        # rows in slots 0..n-1 (a full batch): a view of the logits; else a copy of those rows
        logits = self.out[:len(slots), 0] if slots == list(range(len(slots))) else self.out[slots, 0]
        if self.guides:
            logits = self.guides.apply(logits, slots)
        try:
            ids = sample_rows(logits, [r.sampler for r in rows])
        except Exception:  # noqa: BLE001: find the row at fault, one at a time
            ids = [None] * len(rows)
        for r, nxt in zip(rows, ids):
            self._guard([r], self._advance, r, nxt)

    def _advance(self, r: Request, nxt: int | None) -> None:
        """Take the row's next token; send its text; finish it when it is done."""
        if nxt is None:
            logits = self.out[r.slot:r.slot + 1, 0]
            logits = self.guides.apply(logits, [r.slot]) if self.guides else logits
            nxt = int(r.sampler(logits)[0])
        nxt = int(nxt)
        if not r.tokens:
            r.first_token = time.perf_counter()
        r.tokens.append(nxt)
        reason = ""
        if nxt in r.eos:
            reason = "stop"
        else:
            piece = r.text.push(nxt)
            if piece:
                self._send(r, "text", piece)
            if r.text.stopped:
                reason = "stop"
            elif len(r.tokens) >= r.max_tokens or len(r.prompt) + len(r.tokens) >= self.L:  # budget or context
                reason = "length"
        if reason:
            rest = r.text.finish()
            if rest:
                self._send(r, "text", rest)
            r.finish_reason = reason
            self._release(r)
            self._send(r, "done", reason)
        else:
            r.next_id = nxt
            if r.constraint is not None:
                self.guides.consume(r.slot, nxt)

    def _release(self, r: Request) -> None:
        with self.cond:
            if r.slot >= 0 and self.rows[r.slot] is r:
                self.rows[r.slot] = None
                if r.constraint is not None and self.guides is not None:
                    self.guides.remove(r.slot)

    def _fail(self, r: Request, message: str) -> None:
        self._release(r)
        r.finish_reason = "error"
        self._send(r, "error", message)
