"""OpenAI's tools and structured outputs over a chat template: what /v1/chat/completions needs to take
`response_format`, `tools`, `tool_choice` and `parallel_tool_calls`, and to give back `message.tool_calls`.

    plan = ToolPlan.of(body, chat_format, messages)  # None: no tools, no past calls
    ids = chat_format.encode(plan.messages(messages), tools=plan.template_tools)
    ...generate under plan.constraint...
    content, calls = plan.parse(raw_text)          # calls: OpenAI's tool_calls, [] when the model answered

How a model writes a call is its family's convention, found in its template's source:
  - hermes   <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>   Qwen2.5/3, SmolLM3, Hermes
  - llama3   {"name": ..., "parameters": {...}}                             Llama 3.1-3.3 (custom tools)
  - mistral  [TOOL_CALLS][{"name": ..., "arguments": {...}}]                Mistral
  - generic  a template that does not render `tools`: the tools are described in a system message and the
             answer is JSON, {"tool_calls": [...]} or {"response": "..."} (llama.cpp's generic handler).
The template receives `tools` as transformers' apply_chat_template(tools=...) gives them (the OpenAI
definitions), and past calls with their arguments as objects (as vLLM hands them to templates).

`required` and a named choice constrain the answer to a call of the allowed tools, their arguments to each
tool's schema (llguidance), so it always parses. `auto` is constrained lazily where the family starts a
call with a marker (hermes, mistral): free text until the marker, then the grammar; llama3 and generic
`auto` are parsed after the fact (generic is constrained to its JSON either way).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.run.guidance import Constraint

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# tool calls as templates print JSON (tojson: ", " and ": "), with no other whitespace
CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def response_format_constraint(value) -> Constraint | None:
    """OpenAI's response_format: {"type": "text"} (None), {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise UserError('response_format: expected an object with a "type" (text, json_object or json_schema)')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object("response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise UserError('response_format.json_schema: expected an object with a "name" and a "schema"')
        schema = spec.get("schema", {"type": "object"})
        return Constraint.json_schema(schema, "response_format.json_schema.schema")
    raise UserError(f"response_format: type {kind!r} is not supported (text, json_object or json_schema)")


def check_tools(tools) -> list[dict]:
    """OpenAI's tool definitions, each checked: [{"type": "function", "function": {"name", "description",
    "parameters"}}]; each parameters schema must compile in llguidance."""
    if not isinstance(tools, list) or not tools:
        raise UserError("tools: expected a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    seen = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise UserError(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(f"{where}.function.name: expected 1-64 letters, digits, _ or - (got {name!r})")
        if name in seen:
            raise UserError(f"{where}.function.name: {name!r} is defined twice")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise UserError(f"{where}.function.description: expected a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise UserError(f"{where}.function.parameters: expected a JSON schema object")
        Constraint.json_schema(params, f"{where}.function.parameters")  # one line saying why llguidance refuses it
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def check_tool_choice(choice, tools: list[dict] | None) -> tuple[str, str | None]:
    """("none" | "auto" | "required", the named function or None)."""
    names = [t["function"]["name"] for t in tools or []]
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("none", "auto", "required"):
        if choice != "none" and not tools:
            raise UserError(f"tool_choice: {choice!r} needs tools")
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise UserError(f"tool_choice: function {name!r} is not in tools ({', '.join(names) or 'none given'})")
        return "required", name
    raise UserError('tool_choice: expected "none", "auto", "required" or {"type": "function", "function": {"name"}}')


def tool_format(template_source: str) -> str:
    """The family's way of writing a call, from its template's source."""
    if "<tool_call>" in template_source:
        return "hermes"
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or '"parameters": ' in template_source:
        return "llama3"
    return "generic"


def renders_tools(chat) -> bool:
    """Whether the template prints the tools it is given (transformers' semantics: it receives `tools`)."""
    probe = [{"role": "user", "content": "x"}]
    tool = [{"type": "function", "function": {"name": "probe_tool_zq", "description": "", "parameters": {}}}]
    try:
        return "probe_tool_zq" in chat.render(probe, tools=tool)
    except UserError:
        return False


_FORMATS: dict = {}


def chat_tool_format(chat) -> str:
    """hermes, llama3, mistral or generic (a template that does not render tools), once per template."""
    key = chat.template.source
    if key not in _FORMATS:
        _FORMATS[key] = tool_format(key) if renders_tools(chat) else "generic"
    return _FORMATS[key]


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    tools: list[dict]
    choice: str                      # "none", "auto" or "required"
    name: str | None                 # the named function of a named choice
    parallel: bool
    format: str                      # hermes, llama3, mistral or generic
    special: dict = field(default_factory=dict)   # marker -> its token id, where the tokenizer has it as special
    constraint: Constraint | None = None

    @classmethod
    def of(cls, body: dict, chat, messages: list[dict] | None = None) -> "ToolPlan | None":
        """The request's tools and choice, checked; None when it has no tools and its history no tool calls
        or results (a plain chat: nothing changes)."""
        tools = body.get("tools")
        tools = check_tools(tools) if tools not in (None, []) else []
        choice, name = check_tool_choice(body.get("tool_choice"), tools)
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise UserError("parallel_tool_calls: expected true or false")
        history = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages or [])
        if not tools and not history:
            return None
        plan = cls(tools, choice, name, parallel, chat_tool_format(chat), special=_special_markers(chat.tokenizer))
        plan.constraint = plan._grammar() if choice != "none" else None
        return plan

    @property
    def calls(self) -> bool:
        """Whether the answer may call a tool (and is parsed for calls)."""
        return self.choice != "none"

    # ------------------------------------------------------------------ the prompt
    @property
    def template_tools(self) -> list[dict] | None:
        """What the template receives as `tools` (the generic format describes them itself)."""
        return None if self.format == "generic" or not self.tools else self.tools

    def messages(self, messages: list[dict]) -> list[dict]:
        """The history as the template takes it: past calls' arguments as objects (a template prints them with
        tojson), content "" rather than null; the generic format's calls and results written as its JSON."""
        out = []
        for i, m in enumerate(messages):
            m = dict(m)
            calls = m.get("tool_calls")
            if calls is not None:
                calls = _check_history_calls(calls, i)
            if self.format == "generic":
                if calls:
                    m = {"role": "assistant", "content": json.dumps(
                        {"tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"],
                                         "id": c.get("id")} for c in calls]}, ensure_ascii=False)}
                elif m["role"] == "tool":
                    m = {"role": "user", "content": json.dumps(
                        {"tool_response": {"tool_call_id": m.get("tool_call_id"), "content": m.get("content")}},
                        ensure_ascii=False)}
            elif calls:
                m["tool_calls"] = calls
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
        if self.format == "generic" and self.calls:
            prompt = self._generic_prompt()
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def _generic_prompt(self) -> str:
        """Short: a small model's context is short too."""
        tools = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if f.get(k)}
                            for f in self._allowed()], ensure_ascii=False)
        answer = '{"tool_calls": [{"name": ..., "arguments": {...}}]}'
        if self.choice == "auto":
            answer += ' or {"response": "..."}'
        return f"Tools: {tools}\nAnswer in JSON: {answer}"

    # ------------------------------------------------------------------ the grammar
    def _allowed(self) -> list[dict]:
        return [t["function"] for t in self.tools if self.name in (None, t["function"]["name"])]

    def _call_schema(self, args_key: str = "arguments") -> dict:
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, args_key: f["parameters"]},
                  "required": ["name", args_key], "additionalProperties": False} for f in self._allowed()]
        return calls[0] if len(calls) == 1 else {"anyOf": calls}

    def _marker(self, text: str) -> str:
        """A marker in Lark: the special token itself where the tokenizer has one, else its text."""
        return f"<[{self.special[text]}]>" if text in self.special else json.dumps(text)

    def _grammar(self) -> Constraint | None:
        json_call = lambda schema: "%json " + json.dumps({**schema, "x-guidance": CALL_JSON})  # noqa: E731
        if self.format == "generic":
            calls = {"type": "array", "items": self._call_schema(), "minItems": 1}
            if not self.parallel:
                calls["maxItems"] = 1
            schema = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                      "additionalProperties": False}
            if self.choice == "auto":
                schema = {"anyOf": [schema, {"type": "object", "properties": {"response": {"type": "string"}},
                                             "required": ["response"], "additionalProperties": False}]}
            return Constraint.json_schema(schema, "tools", CALL_JSON)
        if self.format == "hermes":
            marker = self._marker("<tool_call>")
            if self.choice == "required":
                many = ' ("\\n" call)*' if self.parallel else ""
                call = f'{marker} "\\n" {json_call(self._call_schema())} "\\n</tool_call>"'
                return Constraint.lark(f"start: call{many}\ncall: {call}\n", "tools")
            # auto: free text, and from the marker on a call (llguidance's structural tag: a lazy lexeme)
            from llguidance import StructTag

            tag = StructTag(trigger="<tool_call>", begin="<tool_call>\n", end="\n</tool_call>",
                            grammar={**self._call_schema(), "x-guidance": CALL_JSON})
            return Constraint.lark(StructTag.to_grammar([tag], assume_special="<tool_call>" in self.special), "tools")
        if self.format == "mistral":
            items = {"type": "array", "items": self._call_schema(), "minItems": 1}
            if not self.parallel:
                items["maxItems"] = 1
            if self.choice == "required":
                return Constraint.lark(f'start: {self._marker("[TOOL_CALLS]")} {json_call(items)}\n', "tools")
            return None  # auto: parsed after the fact
        # llama3: the call is the whole answer, one JSON object
        if self.choice == "required":
            return Constraint.lark(f"start: {json_call(self._call_schema('parameters'))}\n", "tools")
        return None

    def text_stream(self) -> "TextBeforeCall | None":
        """For a streamed answer that may be text: its text up to a call's marker, shown as it comes (hermes
        auto, the marker in plain text); None where the whole answer is held and parsed at its end."""
        if self.choice == "auto" and self.format == "hermes" and "<tool_call>" not in self.special:
            return TextBeforeCall("<tool_call>")
        return None

    # ------------------------------------------------------------------ the answer
    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of an answer: the calls it makes, in OpenAI's shape, and the text around them."""
        if not self.calls:
            return text, []
        names = {f["name"] for f in self._allowed()}
        found: list[tuple[str, object]] = []
        content = text
        if self.format == "generic":
            found, content = _parse_generic(text)
        elif self.format == "hermes":
            for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
                call = _loads(m.group(1))
                if isinstance(call, dict):
                    found.append((call.get("name"), call.get("arguments", call.get("parameters", {}))))
            content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", text, flags=re.S).strip() if found else text
        elif self.format == "mistral":
            head, marker, rest = text.partition("[TOOL_CALLS]")
            calls = _loads(rest.strip()) if marker else None
            if isinstance(calls, dict):
                calls = [calls]
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, dict):
                    found.append((call.get("name"), call.get("arguments", {})))
            content = head.strip() if found else text
        if not found and self.format != "generic":  # llama3, and the generic fallback: JSON objects as the answer
            body = text.strip().removeprefix("<|python_tag|>").strip()
            for part in body.split(";") if body.startswith("{") else []:
                call = _loads(part.strip())
                if isinstance(call, dict) and "name" in call:
                    found.append((call["name"], call.get("parameters", call.get("arguments", {}))))
            if found:
                content = ""
        calls = [{"id": call_id(), "type": "function",
                  "function": {"name": name, "arguments": args if isinstance(args, str)
                               else json.dumps(args, ensure_ascii=False)}}
                 for name, args in found if name in names]
        if len(calls) != len(found):  # a call of a tool that does not exist: the answer is text
            return text, []
        if calls and not self.parallel:
            calls = calls[:1]
        return (content or None) if calls else content, calls


class TextBeforeCall:
    """An answer's text as it streams, up to a call marker: what cannot be the start of the marker is shown at
    once, the rest waits; from the marker on nothing more is shown (the call is parsed at the end)."""

    def __init__(self, marker: str):
        self.marker, self.text, self.shown, self.stopped = marker, "", 0, False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.stopped:
            return ""
        end = self.text.find(self.marker)
        if end >= 0:
            self.stopped = True
        else:
            end = len(self.text)
            for k in range(min(len(self.marker) - 1, len(self.text)), 0, -1):  # a marker's start at the end waits
                if self.text.endswith(self.marker[:k]):
                    end -= k
                    break
        out, self.shown = self.text[self.shown:end], max(self.shown, end)
        return out

    def rest(self) -> str:
        """What is left to show of an answer that made no call."""
        return self.text[self.shown:]


def _loads(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def _parse_generic(text: str) -> tuple[list, str]:
    answer = _loads(text.strip())
    if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
        return [(c.get("name"), c.get("arguments", {})) for c in answer["tool_calls"] if isinstance(c, dict)], ""
    if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
        c = answer["tool_call"]
        return [(c.get("name"), c.get("arguments", {}))], ""
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return [], answer["response"]
    return [], text


def _check_history_calls(calls, i: int) -> list[dict]:
    """An assistant message's tool_calls, as OpenAI sends them back: arguments (a JSON string) as an object."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise UserError(f"{where}: expected a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f'{where}[{j}]: expected {{"id", "type": "function", '
                            f'"function": {{"name", "arguments"}}}}')
        args = fn.get("arguments", "{}")
        parsed = _loads(args) if isinstance(args, str) else args
        out.append({**c, "type": "function", "function": {"name": fn["name"],
                                                          "arguments": parsed if parsed is not None else args}})
    return out


def _special_markers(tokenizer) -> dict:
    """The call markers the tokenizer has as special tokens (llguidance matches those by id, not by text)."""
    out = {}
    for added in getattr(tokenizer, "get_added_tokens_decoder", lambda: {})().items():
        token_id, token = added
        if token.special and token.content in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
            out[token.content] = token_id
    return out
