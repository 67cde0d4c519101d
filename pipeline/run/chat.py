"""Chat: the model's own template rendered as transformers renders it, and a session that keeps its KV
cache across turns.

    fmt = ChatFormat.of(lm)                       # the export's chat_template.jinja (or tokenizer_config's)
    ids = fmt.encode(messages)                    # == tokenizer.apply_chat_template(messages, tokenize=True,
                                                  #      add_generation_prompt=True) in transformers
    session = ChatSession(lm, system="Be brief.")
    for piece in session.reply("hello"): ...      # turn 2 prefills only what turn 1 did not leave in the cache

The template is untrusted text from the export folder: it runs in jinja2's ImmutableSandboxedEnvironment
with the globals and filters transformers gives it (raise_exception, strftime_now, tojson that keeps
non-ASCII), trim_blocks and lstrip_blocks. The rendered text already holds the special tokens the
template wrote (bos_token, <|im_start|>, ...), so it is tokenized without adding them again.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

import numpy as np

from pipeline.errors import UserError
from pipeline.exports import CHAT_TEMPLATE, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, ChatTemplate, chat_template
from pipeline.run.sampling import Sampler, SamplingConfig
from pipeline.run import speculative
from pipeline.run.speculative import SpeculationStats
from pipeline.run.text import StreamDecoder

ROLES = ("system", "user", "assistant", "tool", "developer")


def compile_template(source: str):
    """The template as transformers compiles it (utils/chat_template_utils.py, _compile_jinja_template)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (assistant masks in training templates): render the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template: not a valid jinja template (line {e.lineno}: {e.message})") from None


def check_messages(messages, where: str = "messages") -> list[dict]:
    """[{"role": ..., "content": "..."}] as a user may hand it to us: one clear line when it is not."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: expected a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"{where}[{i}]: expected an object with a \"role\" string")
        if m["role"] not in ROLES:
            raise UserError(f"{where}[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise UserError(f"{where}[{i}].content: only text parts are supported")
        elif not isinstance(content, str) and not (content is None and m["role"] == "assistant"):
            raise UserError(f"{where}[{i}].content: expected a string")
    return [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m.get("content"), list)
            else m for m in messages]


@dataclass
class ChatFormat:
    template: ChatTemplate
    tokenizer: object
    compiled: object = None

    def __post_init__(self):
        self.compiled = compile_template(self.template.source)

    @classmethod
    def of(cls, lm) -> "ChatFormat":
        """The export's template; its files checked against the manifest first when lm was (a template is
        code, even sandboxed)."""
        if getattr(lm, "verify", False):
            from pipeline import manifest

            manifest.verify(lm.folder, [f for f in (CHAT_TEMPLATE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
                                        if (lm.folder / f).is_file()])
        template = chat_template(lm.folder)
        if template is None:
            raise UserError(f"export {lm.folder}: the model has no chat template (no chat_template.jinja, no "
                            "\"chat_template\" in tokenizer_config.json); use `onnxgen run` for plain text")
        return cls(template, lm.tokenizer)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """tools: OpenAI's tool definitions, handed to the template as transformers' apply_chat_template(tools=)
        does (run/tools.py prepares them)."""
        import jinja2

        extra = {"tools": tools} if tools is not None else {}
        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **extra, **self.template.special_tokens)
        except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a sandbox refusal
            raise UserError(f"chat template: {e}") from None

    def encode(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.encode(self.render(messages, add_generation_prompt, tools), add_special_tokens=False).ids

    def stop_ids(self) -> list[int]:
        """The template's eos_token as an id, when it is one token: some models end a turn with a token that
        generation_config.json does not list (<|im_end|> in older ChatML models)."""
        eos = self.template.special_tokens.get("eos_token")
        token = self.tokenizer.token_to_id(eos) if eos else None
        return [token] if token is not None else []


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


@dataclass
class Turn:
    """What one reply cost: tokens prefilled (new to the cache) and generated, time to first token."""
    prompt_tokens: int = 0
    prefilled: int = 0
    reused: int = 0
    generated: int = 0
    ttft_s: float = 0.0
    seconds: float = 0.0
    stopped: str = ""     # "eos", "length", "context" or "interrupted"
    speculation: SpeculationStats | None = None  # drafts checked and kept (run/speculative.py)


@dataclass
class ChatSession:
    """A conversation whose KV cache lives across turns (fused graphs: SharedBufferDecode with a
    context-long buffer). Each turn renders the whole history, keeps the cached tokens it shares with
    it (the common prefix: a re-tokenized answer or a template that rewrites earlier turns is handled),
    and prefills only the rest. When the buffer cannot hold the turn, it starts again from the history."""
    lm: object
    system: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 256
    reuse: bool = True
    constraint: object = None  # a guidance.Constraint every answer must match (--json, --json-schema, ...)
    speculate: bool | None = None  # prompt lookup (run/speculative.py); None: when greedy on fp32
    draft: object = None  # an OnnxLM with the same tokenizer whose greedy tokens are the drafts (--draft)
    messages: list[dict] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        self.format = ChatFormat.of(self.lm)
        self.eos_ids = set(int(i) for i in self.lm.eos_ids) | set(self.format.stop_ids())
        self.sampler = Sampler(self.sampling)
        self.state, self.cached = None, []  # cached: the ids whose keys the state holds, in order

    def reset(self, system: str | None = None) -> None:
        self.messages, self.state, self.cached = [], None, []
        if system is not None:
            self.system = system or None

    def history(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _prompt(self) -> list[int]:
        """The rendered history; the oldest turns go when it does not fit the context with room to answer."""
        while True:
            ids = self.format.encode(self.history())
            if len(ids) < self.lm.n_ctx - min(self.max_new_tokens, self.lm.n_ctx // 4) or len(self.messages) <= 1:
                break
            self.messages = self.messages[2:] if len(self.messages) > 2 else self.messages[1:]
        self.lm.check_prompt(ids, "conversation")
        return ids

    def _prefill(self, ids: list[int], turn: Turn):
        """The state with `ids` in the cache and logits after the last one: appended to the cached tokens
        when the state can take them, a fresh prefill otherwise."""
        lm, state = self.lm, self.state
        keep = common_prefix(self.cached, ids) if state is not None and self.reuse else 0
        keep = min(keep, len(ids) - 1)  # at least one token goes in: the logits come from it
        if getattr(lm, "has_state", False) and keep < len(self.cached):
            # LFM2's conv state holds every cached token's input and cannot be rewound: the turn reuses the
            # cache only when it extends all of it (the usual case: history, answer, the next message), and
            # otherwise prefills afresh. (Snapshots of the state at each turn's end would save that prefill
            # where a template rewrites the last answer; a fresh prefill is the simple, exact choice.)
            keep = 0
        if state is not None and keep > 0 and hasattr(state, "append") and len(ids) < state.L:
            state.rewind([keep])
            state.append([ids[keep:]])
            turn.reused, turn.prefilled = keep, len(ids) - keep
        else:
            state = self.state = lm.start([ids], lm.n_ctx)  # a context-long buffer: later turns append
            turn.reused, turn.prefilled = 0, len(ids)
        self.cached = list(ids)
        return state

    def _guides(self):
        """A fresh matcher for this answer (ending on the template's end of turn too), or None."""
        if self.constraint is None:
            return None
        from pipeline.run.guidance import Guides, guidance_tokenizer

        guides = Guides(guidance_tokenizer(self.lm.tokenizer, self.lm.vocab_size, self.eos_ids), 1, self.lm.vocab_size)
        guides.add(0, self.constraint)
        return guides

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the answer; the answer joins the history even when the caller
        stops early (Ctrl-C closes this generator), so the session goes on from what was shown."""
        self.messages.append({"role": "user", "content": text})
        turn, t0 = Turn(stopped="interrupted"), time.perf_counter()
        ids = self._prompt()
        turn.prompt_tokens = len(ids)
        decoder, answer = StreamDecoder(self.lm.tokenizer), []
        budget = min(self.max_new_tokens, self.lm.n_ctx - len(ids))
        guides = self._guides()
        try:
            state = self._prefill(ids, turn)
            logits = state.logits
            spec = speculative.start(self.lm, state, [ids], budget, self.sampling.greedy, self.speculate, self.draft)
            turn.speculation, going = spec and spec.stats, np.zeros(1, bool)
            while True:
                if spec is not None and spec.queue:  # chosen by a check of drafts
                    nxt = int(spec.queue.pop(0)[0])
                else:
                    if guides is not None:
                        logits = guides.apply(logits[:1])
                    nxt = int(self.sampler(logits[:1])[0])
                if not answer:
                    turn.ttft_s = time.perf_counter() - t0
                if nxt in self.eos_ids:
                    turn.stopped = "eos"
                    break
                answer.append(nxt)
                piece = decoder.push(nxt)
                if piece:
                    yield piece
                if len(answer) >= budget:
                    turn.stopped = "length" if budget == self.max_new_tokens else "context"
                    break
                self.cached.append(nxt)  # before the step: if it is cut short, lengths says whether it went in
                if guides is not None:
                    guides.consume(0, nxt)
                    guides.prefetch()
                room = min(budget - len(answer) - 1, self.lm.n_ctx - 1 - len(self.cached))
                if spec is not None and spec.after(state, self.sampler, np.array([nxt]), going, room, None, guides):
                    continue  # the next tokens were chosen by a check of drafts
                logits = state.step(np.array([nxt], np.int64), going)
        finally:
            if self.state is not None and hasattr(self.state, "lengths"):
                self.cached = self.cached[:int(self.state.lengths[0])]
            elif self.state is not None:  # the plain graph: no rewind, so the next turn prefills afresh
                self.state = None
            turn.generated, turn.seconds = len(answer), time.perf_counter() - t0
            self.turns.append(turn)
            self.messages.append({"role": "assistant", "content": self.lm.tokenizer.decode(answer)})


def read_messages(source: str) -> list[dict]:
    """--chat FILE or '-': a JSON list of messages."""
    import sys
    from pathlib import Path

    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"--chat {source}: file does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"--chat {source}: not UTF-8 text") from None
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--chat {source}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return check_messages(messages, f"--chat {source}")
