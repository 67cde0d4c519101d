"""Constrained decoding with llguidance: the output must match a JSON schema, a regex or a Lark grammar.

    c = Constraint.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    for piece in lm.stream("Answer in JSON: ", constraint=c): ...

A Constraint is the grammar (checked once, when it is made); each row that generates under it gets its own
LLMatcher, which says, before every pick, which tokens keep the output inside the grammar. The mask turns
the others' logits to -inf, so greedy and sampled picks alike choose among the allowed tokens, and once the
grammar is complete only an end-of-sequence token is allowed: the row ends on it.

llguidance's tokenizer is built from the export's tokenizer.json alone (LLTokenizer(tokenizer.to_str())),
once per model and set of end tokens. Its masks are computed with the GIL released, so `Guides.prefetch`
starts the next step's masks on a worker thread while ONNX Runtime runs the step, and `apply` waits for them.

JSON is compact by default (no free whitespace, "," and ":" separators): a free `[ \\n\\t]*` between tokens
lets a weak model pad with spaces until max_tokens and never close the object.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

# llguidance's JSON options (its "x-guidance" keys): no whitespace outside strings
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match, as llguidance's grammar text. `label` names where it came from, for
    errors ("--json-schema s.json", "response_format")."""
    grammar: str
    label: str = "constraint"

    @classmethod
    def json_schema(cls, schema: dict | bool, label: str = "JSON schema", options: dict | None = None) -> "Constraint":
        if not isinstance(schema, (dict, bool)):
            raise UserError(f"{label}: expected a JSON object (a JSON schema)")
        try:
            grammar = _llg().LLMatcher.grammar_from_json_schema(schema, defaults=options or COMPACT)
        except ValueError as e:
            raise UserError(f"{label}: {e}") from None
        return cls(grammar, label).checked()

    @classmethod
    def json_object(cls, label: str = "--json") -> "Constraint":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls.json_schema({"type": "object"}, label)

    @classmethod
    def regex(cls, pattern: str, label: str = "--regex") -> "Constraint":
        return cls(_llg().LLMatcher.grammar_from_regex(pattern), label).checked()

    @classmethod
    def lark(cls, text: str, label: str = "--grammar") -> "Constraint":
        return cls(_llg().LLMatcher.grammar_from_lark(text), label).checked()

    @classmethod
    def from_file(cls, kind: str, path: str | Path) -> "Constraint":
        """--json-schema FILE or --grammar FILE.lark."""
        label = f"--{kind} {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"{label}: file does not exist") from None
        except UnicodeDecodeError:
            raise UserError(f"{label}: not UTF-8 text") from None
        if kind == "grammar":
            return cls.lark(text, label)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{label}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.json_schema(schema, label)

    def checked(self) -> "Constraint":
        """self, if llguidance compiles the grammar; else one line saying why."""
        error = _llg().LLMatcher.validate_grammar(self.grammar)
        if error:
            raise UserError(f"{self.label}: llguidance rejects it ({_first_line(error)})")
        return self


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    # a regex's parse error puts the reason on a line of its own ("error: unclosed group")
    reason = next((line for line in lines if line.startswith("error:")), None)
    if not lines:
        return "invalid"
    if reason:
        head = lines[0].removesuffix("regex parse error:").rstrip(": ")
        return f"{head}: {reason.removeprefix('error:').strip()}"
    return lines[0]


def _llg():
    import llguidance

    return llguidance


_TOKENIZERS: dict = {}


def guidance_tokenizer(tokenizer, vocab_size: int, eos_ids) -> object:
    """llguidance's view of a `tokenizers` Tokenizer, made once per (tokenizer, vocabulary, end tokens): the
    export's tokenizer.json is all it reads. vocab_size is the model's logits width (it may pad past the
    tokenizer's ids: those are never allowed); eos_ids end a row once its grammar is complete."""
    eos = tuple(sorted(int(i) for i in eos_ids))
    key = (id(tokenizer), vocab_size, eos)
    cached = _TOKENIZERS.get(key)
    if cached is None or cached[0] is not tokenizer:
        cached = _TOKENIZERS[key] = (tokenizer, _llg().LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                                    eos_token=list(eos)))
    return cached[1]


class Guides:
    """The matchers of a batch's constrained rows (row -> LLMatcher) and their token masks, one bit a token.

    Rows without a constraint are left alone: a batch with none costs nothing here (the caller makes no
    Guides at all)."""

    _pool: ThreadPoolExecutor | None = None
    overlap = True  # prefetch() computes masks on a worker thread; False: apply() computes them (benchmarks)

    def __init__(self, tokenizer, rows: int, vocab_size: int):
        self.tokenizer, self.V = tokenizer, vocab_size
        self.matchers: dict[int, object] = {}
        self.bits = np.full((rows, (vocab_size + 31) // 32), -1, dtype=np.int32)  # (B, V/32)
        self.pending: Future | None = None
        self.ready = False  # the masks in self.bits are those of the matchers' current state

    def add(self, row: int, constraint: Constraint, tokenizer=None) -> None:
        """A matcher for `row`; tokenizer: one whose end tokens are this row's (default: the batch's)."""
        llg = _llg()
        matcher = llg.LLMatcher(tokenizer or self.tokenizer, constraint.grammar, log_level=0)
        if matcher.is_error():
            raise UserError(f"{constraint.label}: llguidance rejects it ({_first_line(matcher.get_error())})")
        self.wait()
        self.matchers[row] = matcher
        self.ready = False

    def remove(self, row: int) -> None:
        self.wait()
        self.matchers.pop(row, None)

    def __bool__(self) -> bool:
        return bool(self.matchers)

    # ------------------------------------------------------------------ masks
    def _fill(self) -> None:
        for row, m in self.matchers.items():
            v = self.bits[row]
            m.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)  # releases the GIL

    def prefetch(self) -> None:
        """Start computing the masks of the matchers' current state on a worker thread (call it before ONNX
        Runtime runs the step whose logits they will mask)."""
        if self.overlap and self.matchers and self.pending is None:
            if Guides._pool is None:
                Guides._pool = ThreadPoolExecutor(1, thread_name_prefix="onnxgen-guidance")
            self.pending = Guides._pool.submit(self._fill)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
            self.ready = True

    def apply(self, logits: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
        """logits (n, V) of batch rows `rows` (default 0..n-1) -> a copy with each constrained row's
        disallowed tokens at -inf; rows without a matcher unchanged."""
        self.wait()
        if not self.ready:
            self._fill()
            self.ready = True
        rows = list(range(len(logits))) if rows is None else rows
        which = [i for i, r in enumerate(rows) if r in self.matchers]
        if not which:
            return logits
        # one bit a token -> (n, V) bools: unpackbits with count and a bool view, then one np.where, is ~55 us
        # at 49k tokens where astype(bool), a copy and a masked assignment took ~430 us
        bits = self.bits[[rows[i] for i in which]].view(np.uint8)
        allowed = np.unpackbits(bits, axis=1, count=logits.shape[1], bitorder="little").view(bool)
        if len(which) == len(rows):
            return np.where(allowed, logits, np.float32(-np.inf))
        out = logits.copy()
        out[which] = np.where(allowed, logits[which], np.float32(-np.inf))
        return out

    def consume(self, row: int, token: int) -> None:
        """The row's pick joins its matcher's state (a pick the mask allowed always does)."""
        m = self.matchers.get(row)
        if m is None:
            return
        self.wait()
        self.ready = False
        if m.is_stopped():  # the grammar is complete: the pick was an end token
            return
        assert m.consume_token(int(token)), f"llguidance refused a token its own mask allowed: {m.get_error()}"


    def advance(self, row: int, token: int) -> int:
        """Speculation's check of a draft token the row's mask allowed: consumed now (the next apply() masks the
        position after it), and 1 returned when the matcher took it, for rollback() after the check."""
        m = self.matchers.get(row)
        if m is None or m.is_stopped():
            return 0
        self.consume(row, token)
        return 1

    def rollback(self, row: int, n: int) -> None:
        """Undo the last n tokens the row's matcher took (llguidance's rollback)."""
        if n and row in self.matchers:
            self.wait()
            assert self.matchers[row].rollback(n), self.matchers[row].get_error()
            self.ready = False


def constraint_from_options(json_schema=None, json_object: bool = False, regex: str | None = None,
                            grammar=None) -> Constraint | None:
    """The CLI's --json-schema FILE, --json, --regex RE and --grammar FILE.lark (at most one), or None."""
    given = [name for name, value in (("--json-schema", json_schema), ("--json", json_object), ("--regex", regex),
                                      ("--grammar", grammar)) if value not in (None, False)]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)}: give one constraint, not several")
    if json_schema is not None:
        return Constraint.from_file("json-schema", json_schema)
    if grammar is not None:
        return Constraint.from_file("grammar", grammar)
    if regex is not None:
        return Constraint.regex(regex, f"--regex {regex!r}")
    return Constraint.json_object() if json_object else None
