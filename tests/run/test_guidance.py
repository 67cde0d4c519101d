"""Constrained decoding (llguidance) and OpenAI's structured outputs and tools: the CLI's --json-schema,
--json, --regex and --grammar; the server's response_format, tools, tool_choice and parallel_tool_calls
through the official `openai` client; constrained rows beside free rows, each equal to its run alone; and
random-weight models, where the constraint alone is what makes the output valid."""
from __future__ import annotations

import json
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pytest

from conftest import assert_user_error, onnxgen

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from test_serve import _post, running  # noqa: E402 (the server in this process, on a free loopback port)

# bounded: every value has a largest form, so even a random model reaches the end of the object
SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["n", "ok", "colour", "tags"], "additionalProperties": False}
SMALL = {"type": "object",
         "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "ok": {"type": "boolean"}},
         "required": ["n", "ok"], "additionalProperties": False}
# the tiny model's context is 128 positions: a tool short enough for the generic format's system message
PING = {"type": "function", "function": {"name": "ping", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": DIGIT, "b": DIGIT},
                                  "required": ["a", "b"], "additionalProperties": False}}}
# Hermes conventions (Qwen2.5's <tool_call> markers) in a template short enough for the tiny model's 128 positions
# and its code tokenizer (which spends 10 tokens on <|im_start|>)
HERMES = (
    "{% if tools %}tools:{% for t in tools %} {{ t.function.name }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ m.role + ': ' + m.content }}{% for c in m.tool_calls or [] %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def _compact(text: str) -> bool:
    """No whitespace outside the JSON's strings."""
    import re

    return not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', text))


@pytest.fixture(scope="module")
def random_export(tiny_chat_export, tmp_path_factory):
    """tiny_chat_export with random weights in both graphs (the same draw for a weight of the same name and
    shape): a model whose text is noise. Loaded with verify=False (its files no longer match the manifest)."""
    import onnx
    from onnx import numpy_helper

    out = tmp_path_factory.mktemp("exports") / "tiny_random"
    shutil.copytree(tiny_chat_export, out)
    for path in (out / "onnx").glob("*.onnx"):
        model = onnx.load(str(path))
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype == np.float32 and w.size > 1:
                rng = np.random.default_rng(zlib.crc32(f"{init.name}{w.shape}".encode()))
                init.CopyFrom(numpy_helper.from_array(rng.normal(0, 0.5, w.shape).astype(np.float32), init.name))
        onnx.save(model, str(path))
    return out


@pytest.fixture(scope="module")
def hermes_export(tiny_fused_export, tmp_path_factory):
    from pipeline import manifest
    from pipeline.exports import write_chat_template

    out = tmp_path_factory.mktemp("exports") / "tiny_hermes"
    shutil.copytree(tiny_fused_export, out)
    manifest.record(out, "chat-template", write_chat_template(out, HERMES))
    return out


def _alone(lm, ids, max_tokens, constraint=None, temperature=0.0, seed=None, eos=()):
    """The text a request gets run by itself through OnnxLM's own loop (its template's end tokens added)."""
    from pipeline.run.lm import Generation
    from pipeline.run.sampling import SamplingConfig

    saved, lm.eos_ids = lm.eos_ids, np.union1d(lm.eos_ids, list(eos)).astype(np.int64)
    try:
        result = Generation()
        for _ in lm.generate([ids], max_tokens, SamplingConfig(temperature=temperature, seed=seed), result=result,
                             constraint=constraint):
            pass
    finally:
        lm.eos_ids = saved
    return lm.tokenizer.decode([t for t in result.tokens[0] if t not in lm.eos_ids]), result.stop_reason[0]


# ----------------------------------------------------------------------------- the engine


def test_random_weights_give_valid_json_only_under_the_constraint(random_export):
    """A random model's text is noise; under the schema it is a compact object that validates, ended by eos
    well before max_tokens (no free whitespace to loop on), greedy and sampled alike."""
    from pipeline.run.guidance import Constraint
    from pipeline.run.lm import Generation, OnnxLM
    from pipeline.run.sampling import SamplingConfig

    c = Constraint.json_schema(SCHEMA)
    prompts = ["import os", "def main(argv):", "x = ["]
    for fused in (False, True):
        lm = OnnxLM(random_export, fused=fused)
        free = lm.complete(prompts, 100)
        assert not any(_valid(t, SCHEMA) for t in free), free
        for sampling in (SamplingConfig(), SamplingConfig(temperature=1.5, seed=3),
                         SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=4)):
            result = Generation()
            texts = lm.complete(prompts, 100, sampling, result=result, constraint=c)
            assert result.stop_reason == ["eos"] * 3, (texts, result.stop_reason)
            for text in texts:
                jsonschema.validate(json.loads(text), SCHEMA)
                assert _compact(text), text


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_constrained_rows_beside_free_rows_equal_their_runs_alone(tiny_export):
    """A batch of constrained (schema, regex, grammar) and free rows on the plain graph (left padding): each
    greedy row gets what it gets alone; sampled, every constrained row still matches its grammar. (Sampled rows
    of one generate() share one generator; the server's rows, each with its own, are compared below.)"""
    import re

    from pipeline.run.guidance import Constraint
    from pipeline.run.lm import Generation, OnnxLM
    from pipeline.run.sampling import SamplingConfig

    lm = OnnxLM(tiny_export)
    rows = [Constraint.json_schema(SCHEMA), None, Constraint.regex(r"[a-z]{2,5}-[0-9]{2}"), None,
            Constraint.lark('start: "yes" | "no" | "maybe"')]
    prompts = [lm.encode(p) for p in ["import os", "def f(x):", "class A:", "x = [", "try:"]]
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.9, seed=11)):
        batch = Generation()
        for _ in lm.generate(prompts, 60, sampling, result=batch, constraint=rows):
            pass
        for b, (p, c) in enumerate(zip(prompts, rows) if sampling.greedy else ()):
            alone = Generation()
            for _ in lm.generate([p], 60, sampling, result=alone, constraint=c):
                pass
            assert batch.tokens[b] == alone.tokens[0] and batch.stop_reason[b] == alone.stop_reason[0], b
        texts = [lm.tokenizer.decode([t for t in toks if t not in lm.eos_ids]) for toks in batch.tokens]
        jsonschema.validate(json.loads(texts[0]), SCHEMA)
        assert re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", texts[2]) and texts[4] in ("yes", "no", "maybe"), texts
        assert [batch.stop_reason[b] for b in (0, 2, 4)] == ["eos"] * 3


def test_chat_session_answers_under_the_constraint(tiny_chat_export):
    from pipeline.run.chat import ChatSession
    from pipeline.run.guidance import Constraint
    from pipeline.run.lm import OnnxLM

    session = ChatSession(OnnxLM(tiny_chat_export, fused=True), constraint=Constraint.json_schema(SMALL),
                          max_new_tokens=30)
    for turn in ("hi", "again"):
        answer = "".join(session.reply(turn))
        jsonschema.validate(json.loads(answer), SMALL)
        assert session.turns[-1].stopped == "eos"


def test_hermes_auto_is_free_text_until_the_marker_then_a_call(hermes_export):
    """tool_choice auto (lazy): any text is allowed, and once the model writes <tool_call> only a call of the
    offered tools can follow, which parses."""
    from pipeline.run.chat import ChatFormat
    from pipeline.run.guidance import Guides, guidance_tokenizer
    from pipeline.run.lm import OnnxLM
    from pipeline.run.tools import ToolPlan

    lm = OnnxLM(hermes_export)
    chat = ChatFormat.of(lm)
    plan = ToolPlan.of({"tools": [WEATHER, ADD], "tool_choice": "auto"}, chat)
    assert plan.format == "hermes" and plan.constraint is not None
    guides = Guides(guidance_tokenizer(lm.tokenizer, lm.vocab_size, lm.eos_ids), 1, lm.vocab_size)
    guides.add(0, plan.constraint)
    V = lm.vocab_size
    for token in lm.encode("Let me look that up. <tool_call>\n"):
        assert np.isfinite(guides.apply(np.zeros((1, V), np.float32))[0, token])  # free text, then the marker
        guides.consume(0, token)
    allowed = np.flatnonzero(np.isfinite(guides.apply(np.zeros((1, V), np.float32))[0]))
    assert 0 < len(allowed) < 10 and all(lm.tokenizer.decode([int(t)]).startswith("{") for t in allowed)
    rng, tokens = np.random.default_rng(0), []
    for _ in range(60):  # noise under the mask: a call of one of the tools
        t = int(guides.apply(rng.normal(size=(1, V)).astype(np.float32)).argmax())
        tokens.append(t)
        if lm.tokenizer.decode(tokens).endswith("</tool_call>"):
            break
        guides.consume(0, t)
    content, calls = plan.parse("Let me look that up. <tool_call>\n" + lm.tokenizer.decode(tokens))
    assert content.startswith("Let me look that up.") and len(calls) == 1
    schema = {"get_weather": WEATHER, "add": ADD}[calls[0]["function"]["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schema)


@pytest.mark.parametrize("fmt, text, want", [
    ("hermes", 'ok <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     [("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": '
               '"get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>',
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("llama3", '{"name": "add", "parameters": {"a": 3, "b": 4}}', [("add", {"a": 3, "b": 4})]),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 3, "b": 4}}', [("add", {"a": 3, "b": 4})]),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 5, "b": 6}}]', [("add", {"a": 5, "b": 6})]),
    ("generic", '{"tool_calls": [{"name": "add", "arguments": {"a": 7, "b": 8}}]}', [("add", {"a": 7, "b": 8})]),
    ("hermes", '{"name": "add", "arguments": {"a": 9, "b": 0}}', [("add", {"a": 9, "b": 0})]),  # the fallback
    ("hermes", "just text, no call", []),
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),   # not an offered tool: text
])
def test_parse_each_family(fmt, text, want):
    from pipeline.run.tools import ToolPlan

    plan = ToolPlan([WEATHER, ADD], "auto", None, True, fmt)
    content, calls = plan.parse(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    if not want:
        assert content == text


def test_text_before_a_call_streams_as_it_comes():
    from pipeline.run.tools import TextBeforeCall

    t = TextBeforeCall("<tool_call>")
    pieces = ["Let me", " check <", "to", "ol_call>\n{", '"name"']
    assert [t.push(p) for p in pieces] == ["Let me", " check ", "", "", ""]
    t = TextBeforeCall("<tool_call>")
    assert [t.push(p) for p in ["a <", "b", " <tool"]] == ["a ", "<b", " "] and t.rest() == "<tool"


# ----------------------------------------------------------------------------- the command line


def test_cli_constraints(tiny_export, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    out = onnxgen("run", tiny_export, "import os", "--json-schema", schema, "--no-echo",
                  "--max-new-tokens", "100").stdout
    jsonschema.validate(json.loads(out), SCHEMA)
    out = onnxgen("run", tiny_export, "x =", "--regex", "[0-9]{3}-[a-z]{2}", "--no-echo", "--temperature", "1",
                  "--seed", "1").stdout.strip()
    assert len(out) == 6 and out[:3].isdigit() and out[3] == "-"
    grammar = tmp_path / "g.lark"
    grammar.write_text('start: "yes" | "no"\n')
    assert onnxgen("run", tiny_export, "ok?", "--grammar", grammar, "--no-echo").stdout.strip() in ("yes", "no")


@pytest.mark.parametrize("args, words", [
    (["--regex", "a(b"], ["--regex", "unclosed group"]),
    (["--json-schema", "{tmp}/bad.json"], ["--json-schema", "frob"]),
    (["--json-schema", "{tmp}/notjson.json"], ["--json-schema", "not valid JSON"]),
    (["--json-schema", "{tmp}/missing.json"], ["--json-schema", "does not exist"]),
    (["--grammar", "{tmp}/bad.lark"], ["--grammar", "foo"]),
    (["--json", "--regex", "a"], ["--json", "--regex", "one constraint"]),
])
def test_cli_bad_constraints_exit_2_with_one_line(tiny_export, tmp_path, args, words):
    (tmp_path / "bad.json").write_text('{"type": "frob"}')
    (tmp_path / "notjson.json").write_text("{")
    (tmp_path / "bad.lark").write_text("start: foo\n")
    args = [a.format(tmp=tmp_path) for a in args]
    assert_user_error(onnxgen("run", tiny_export, "x", *args, check=False), *words)
    assert_user_error(onnxgen("chat", tiny_export, *args, check=False, input="hi\n"), *words)


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def served(tiny_chat_export):
    with running(tiny_chat_export) as s:
        yield s


def test_parse_returns_the_pydantic_object(served):
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        n: int = Field(ge=0, le=99)
        colour: Literal["red", "green", "blue"]
        ok: bool

    client, server, _ = served
    r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "A colour?"}],
                                      response_format=Answer, max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Answer) and r.choices[0].finish_reason == "stop"
    # an answer that cannot end within max_tokens (a json_object may: "{}" is two tokens, and a sampled one did)
    long = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
        "type": "object", "properties": {"text": {"type": "string", "minLength": 16}}, "required": ["text"]}}}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       response_format=long, seed=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")  # text so far
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       response_format={"type": "json_object"}, temperature=0)
    assert r.choices[0].message.content.startswith("{")  # json_object: an object, whole or cut
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL, "strict": True}}
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "n?"}], max_tokens=30,
                                           temperature=0, response_format=fmt).choices[0].message.content
    pieces = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "n?"}], max_tokens=30,
                                            temperature=0, response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == whole
    jsonschema.validate(json.loads(whole), SMALL)
    text = client.completions.create(model="tiny", prompt="x = ", max_tokens=30,
                                     extra_body={"response_format": fmt}).choices[0].text
    jsonschema.validate(json.loads(text), SMALL)  # plain completions take a response_format too


def test_structured_and_free_requests_batched_each_equal_alone(served):
    from pipeline.run.guidance import Constraint

    client, server, _ = served
    lm, chat = server.lm, server.chat
    jobs = []
    for i in range(8):
        messages = [{"role": "user", "content": ["import os", "def f():", "x = [", "class A:"][i % 4]}]
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL}} if i % 2 == 0 else None
        jobs.append(dict(messages=messages, max_tokens=24 + i, temperature=[0.0, 0.8][i // 4 % 2], seed=i,
                         **({"response_format": fmt} if fmt else {})))

    def call(job):
        return client.chat.completions.create(model="tiny", **job).choices[0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, jobs))
    for job, choice in zip(jobs, got):
        c = Constraint.json_schema(SMALL) if "response_format" in job else None
        want = _alone(lm, chat.encode(job["messages"]), job["max_tokens"], c, job["temperature"], job["seed"],
                      chat.stop_ids())
        assert choice.message.content == want[0], job
        if c is not None:
            jsonschema.validate(json.loads(choice.message.content), SMALL)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "ping"}}, "auto"])
def test_generic_format_for_a_template_without_tools(tiny_chat_export, choice):
    """The tiny model's template does not render tools: they are described in a system message and the answer
    is the generic JSON, constrained (auto: a call or a response), so even noise parses; a past call and its
    result go back as that JSON. (Through the server this needs more than the tiny model's 128 positions.)"""
    from pipeline.run.chat import ChatFormat
    from pipeline.run.guidance import Guides, guidance_tokenizer
    from pipeline.run.lm import OnnxLM
    from pipeline.run.tools import ToolPlan

    lm = OnnxLM(tiny_chat_export, fused=True)
    chat = ChatFormat.of(lm)
    messages = [{"role": "user", "content": "ping?"}]
    plan = ToolPlan.of({"tools": [PING, ADD], "tool_choice": choice, "parallel_tool_calls": False}, chat, messages)
    assert plan.format == "generic" and plan.template_tools is None
    rendered = chat.render(plan.messages(messages))
    assert rendered.startswith("<|im_start|>system\nTools: ") and '"name": "ping"' in rendered
    guides = Guides(guidance_tokenizer(lm.tokenizer, lm.vocab_size, lm.eos_ids), 1, lm.vocab_size)
    guides.add(0, plan.constraint)
    rng, tokens = np.random.default_rng(1), []
    for _ in range(120):
        t = int(guides.apply(rng.normal(size=(1, lm.vocab_size)).astype(np.float32)).argmax())
        if t in lm.eos_ids:
            break
        tokens.append(t)
        guides.consume(0, t)
    else:
        raise AssertionError("the answer did not end")
    content, calls = plan.parse(lm.tokenizer.decode(tokens))
    if choice == "auto" and not calls:
        assert isinstance(content, str) and json.loads(lm.tokenizer.decode(tokens))["response"] == content
        return
    assert len(calls) == 1 and content is None
    if isinstance(choice, dict):
        assert calls[0]["function"]["name"] == "ping"
    tool = {"ping": PING, "add": ADD}[calls[0]["function"]["name"]]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), tool["function"]["parameters"])
    history = messages + [{"role": "assistant", "content": None, "tool_calls": calls},
                          {"role": "tool", "tool_call_id": calls[0]["id"], "content": "pong"}]
    rendered = chat.render(ToolPlan.of({"tools": [PING], "tool_choice": "none"}, chat, history).messages(history))
    assert calls[0]["function"]["arguments"] in rendered and '"tool_response"' in rendered and "pong" in rendered
    assert "Tools: " not in rendered  # tool_choice none: no call asked for, no tool prompt


def test_tool_loop_hermes_whole_and_streamed(hermes_export):
    """A template with tool support (Hermes markers), through the openai client: required and named choices
    come back as tool_calls that validate (also as delta.tool_calls chunks with their index, adding up to
    the same), the call and its result go back through the template, and the model answers."""
    with running(hermes_export) as (client, server, _):
        messages = [{"role": "user", "content": "weather in Oslo, and 2 + 3"}]
        assert "get_weather" in server.chat.render(messages, tools=[WEATHER, ADD])  # the template got the tools
        kw = dict(model="tiny", messages=messages, tools=[WEATHER, ADD], tool_choice="required", max_tokens=70,
                  temperature=0)
        r = client.chat.completions.create(**kw)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason in ("tool_calls", "length") and calls
        for c in calls:
            tool = {"add": ADD, "get_weather": WEATHER}[c.function.name]
            jsonschema.validate(json.loads(c.function.arguments), tool["function"]["parameters"])
            assert c.type == "function" and c.id.startswith("call_")
        chunks = list(client.chat.completions.create(stream=True, **kw))
        streamed: dict[int, dict] = {}
        for chunk in chunks:
            for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                s = streamed.setdefault(d.index, {"name": "", "arguments": ""})
                s["name"] += (d.function.name or "") if d.function else ""
                s["arguments"] += (d.function.arguments or "") if d.function else ""
        assert [(s["name"], s["arguments"]) for _, s in sorted(streamed.items())] == \
            [(c.function.name, c.function.arguments) for c in calls]
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        one = client.chat.completions.create(**{**kw, "parallel_tool_calls": False,
                                                "tool_choice": {"type": "function", "function": {"name": "add"}}})
        assert one.choices[0].finish_reason == "tool_calls" and one.choices[0].message.content is None
        [call] = one.choices[0].message.tool_calls
        assert call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
        # the call and its result go back through the template, and the model answers
        messages += [one.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "5"}]
        rendered = server.chat.render(server_messages(server, messages, [WEATHER, ADD]), tools=[WEATHER, ADD])
        assert f'<tool_call>\n{{"name": "add", "arguments": {call.function.arguments}}}\n</tool_call>' in rendered
        assert "\ntool: 5\n" in rendered
        kw = dict(model="tiny", messages=messages, tools=[WEATHER, ADD], max_tokens=6, temperature=0)
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        if r.choices[0].finish_reason != "tool_calls":  # auto, answered in text: streamed as it comes, the same
            assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls
            chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
            assert sum(bool(c.choices[0].delta.content) for c in chunks) > 1  # piece by piece, not held to the end


def server_messages(server, messages, tools):
    from pipeline.run.tools import ToolPlan

    return ToolPlan.of({"tools": tools}, server.chat, messages).messages(messages)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "frob"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]}, "tools"),
    ({"tools": [ADD], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_structured_requests_are_400s_naming_the_parameter(served, extra, param):
    client, server, url = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    code, reply = _post(f"{url}/chat/completions", json.dumps(body))
    assert code == 400 and reply["error"]["param"] == param, reply
    assert reply["error"]["message"].startswith(param), reply
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].finish_reason  # still serving
