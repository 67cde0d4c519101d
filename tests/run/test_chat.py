"""Chat templates rendered as transformers renders them, carried by exports, and a chat session whose KV
cache lives across turns."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import CHATML_TEMPLATE, LLAMA3_TEMPLATE, assert_user_error, onnxgen

MESSAGES = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is  the capital of France?  "},
    {"role": "assistant", "content": "Paris, of course — café au lait."},
    {"role": "user", "content": "And of Japan? 東京?"},
]
# trim_blocks/lstrip_blocks, raise_exception and tojson (non-ASCII kept) all change what this renders
STRICT_TEMPLATE = """{%- if messages[0]['role'] != 'system' %}
    {{ raise_exception('the first message must be the system prompt') }}
{% endif %}
{% for m in messages %}
    {% if m['role'] == 'user' %}
<u>{{ m['content'] | tojson }}</u>
    {% else %}
<{{ m['role'][0] }}>{{ m['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<a>{% endif %}"""


def _hf_tokenizer(tiny_export, folder, template, specials):
    """A transformers tokenizer over the tiny model's tokenizer.json with the template's special tokens,
    saved as a model folder would be (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_export / "tokenizer.json"), bos_token=specials[0],
                                  eos_token=specials[1], additional_special_tokens=list(specials[2:]))
    tok.chat_template = template
    tok.save_pretrained(folder)
    return tok


@pytest.mark.parametrize("name, template, specials", [
    ("chatml", CHATML_TEMPLATE, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]),
    ("llama3", LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    ("strict", STRICT_TEMPLATE, ["<s>", "</s>"]),
])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_gives_transformers_token_ids(tiny_export, tmp_path, name, template, specials, generation_prompt):
    from tokenizers import Tokenizer

    from pipeline.exports import chat_template
    from pipeline.run.chat import ChatFormat

    folder = tmp_path / name
    hf = _hf_tokenizer(tiny_export, folder, template, specials)
    want = hf.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt, tokenize=True,
                                  return_dict=False)  # transformers 5's default is a dict
    ours = ChatFormat(chat_template(folder), Tokenizer.from_file(str(folder / "tokenizer.json")))
    assert ours.render(MESSAGES, generation_prompt) == hf.apply_chat_template(
        MESSAGES, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours.encode(MESSAGES, generation_prompt) == want
    assert specials[1] in ours.render(MESSAGES) or name == "chatml"  # eos_token reached the template
    if name == "llama3":
        assert want[0] == hf.convert_tokens_to_ids("<|begin_of_text|>") and want.count(want[0]) == 1  # one BOS


def test_template_errors_and_sandbox_are_one_line(tiny_export, tmp_path):
    from tokenizers import Tokenizer

    from pipeline.errors import UserError
    from pipeline.exports import ChatTemplate
    from pipeline.run.chat import ChatFormat, check_messages

    tok = Tokenizer.from_file(str(tiny_export / "tokenizer.json"))
    with pytest.raises(UserError, match="must be the system prompt"):
        ChatFormat(ChatTemplate(STRICT_TEMPLATE, {}), tok).render(MESSAGES[1:])
    with pytest.raises(UserError, match="unsafe|access"):  # the sandbox: no reaching into Python internals
        ChatFormat(ChatTemplate("{{ messages.__class__.__mro__ }}", {}), tok).render(MESSAGES)
    with pytest.raises(UserError, match="not a valid jinja"):
        ChatFormat(ChatTemplate("{% for %}", {}), tok)
    for bad in ([], [{"content": "x"}], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(UserError):
            check_messages(bad)


def test_export_keeps_the_template_in_both_places(tiny_chat_export):
    from pipeline import manifest
    from pipeline.exports import CHAT_TEMPLATE, chat_template

    config = json.loads((tiny_chat_export / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (tiny_chat_export / CHAT_TEMPLATE).read_text() == chat_template(tiny_chat_export).source
    manifest.verify(tiny_chat_export, [CHAT_TEMPLATE, "tokenizer_config.json"])


@pytest.mark.slow
def test_hf_import_carries_the_chat_template(hf_models, tmp_path):
    from pipeline import manifest
    from pipeline.convert.hf_import import export_hf
    from pipeline.exports import CHAT_TEMPLATE

    src = tmp_path / "llama"
    shutil.copytree(hf_models["llama"], src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / CHAT_TEMPLATE).unlink(missing_ok=True)
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_TEMPLATE}))
    out = tmp_path / "out"
    export_hf(src, out)
    assert (out / CHAT_TEMPLATE).read_text() == LLAMA3_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3_TEMPLATE
    assert {CHAT_TEMPLATE, "tokenizer_config.json"} <= set(manifest.load(out)["files"])
    manifest.verify(out)


# ----------------------------------------------------------------------------- the session

def test_cache_reuse_gives_the_tokens_of_a_fresh_prefill(tiny_chat_export):
    """Turn after turn, appending to the kept cache gives the tokens that prefilling the whole history gives."""
    from pipeline.run.chat import ChatSession
    from pipeline.run.lm import OnnxLM
    from pipeline.run.sampling import SamplingConfig

    lm = OnnxLM(tiny_chat_export, fused=True, verify=True)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.9, top_p=0.95, seed=3)):
        kept = ChatSession(lm, system="Be brief.", sampling=sampling, max_new_tokens=6)
        fresh = ChatSession(lm, system="Be brief.", sampling=sampling, max_new_tokens=6, reuse=False)
        for question in ["import os", "def f(x):", "return", "class A:", "try:"]:
            assert "".join(kept.reply(question)) == "".join(fresh.reply(question)), question
        assert kept.messages == fresh.messages
        reused = [t.reused for t in kept.turns[1:]]
        assert any(reused), kept.turns  # the cache did carry over (until the context forced a restart)
        assert all(t.reused + t.prefilled == t.prompt_tokens for t in kept.turns)


def test_append_equals_one_prefill(tiny_fused_export):
    import numpy as np

    from pipeline.run.lm import OnnxLM

    lm = OnnxLM(tiny_fused_export, fused=True)
    a, b = lm.encode("import os\nimport sys\n"), lm.encode("def main(argv):\n    return 0\n")
    whole = lm.start([a + b], 4).logits.copy()
    state = lm.start([a], 64)
    state.append([b])
    np.testing.assert_allclose(state.logits, whole, atol=1e-5)
    state.rewind([3])  # forget, then more again
    np.testing.assert_allclose(state.append([a[3:] + b]), whole, atol=1e-5)
    assert state.lengths.tolist() == [len(a + b)]
    nxt = np.array([int(whole.argmax())])
    assert state.step(nxt, np.zeros(1, bool)).argmax() == lm.start([a + b + nxt.tolist()], 4).logits.argmax()


def test_interrupted_answer_keeps_the_session(tiny_chat_export):
    from pipeline.run.chat import ChatSession
    from pipeline.run.lm import OnnxLM

    lm = OnnxLM(tiny_chat_export, fused=True)
    session = ChatSession(lm, max_new_tokens=12)
    pieces = session.reply("import os")
    next(pieces)
    pieces.close()  # what Ctrl-C does to the generator
    assert session.turns[-1].stopped == "interrupted" and session.messages[-1]["role"] == "assistant"
    assert len(session.cached) == int(session.state.lengths[0])
    fresh = ChatSession(lm, max_new_tokens=12, reuse=False)
    fresh.messages = list(session.messages)
    assert "".join(session.reply("def f():")) == "".join(fresh.reply("def f():"))


def test_run_chat_takes_messages_as_json(tiny_chat_export, tmp_path):
    from pipeline.run.chat import ChatFormat
    from pipeline.run.lm import OnnxLM

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "import os"}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(messages))
    out = onnxgen("run", tiny_chat_export, "--chat", path, "--max-new-tokens", "8", "--temperature", "0").stdout
    lm = OnnxLM(tiny_chat_export, fused=True)
    ids = ChatFormat.of(lm).encode(messages)
    want = lm.tokenizer.decode(_tokens(lm, ids, 8))
    assert out == want + "\n"
    assert onnxgen("run", tiny_chat_export, "--chat", "-", "--max-new-tokens", "8", "--temperature", "0",
                   input=json.dumps(messages)).stdout == out
    assert_user_error(onnxgen("run", tiny_chat_export, "--chat", "-", input="[{\"role\": 1}]", check=False), "--chat")
    assert_user_error(onnxgen("run", tiny_chat_export, "--chat", "-", input="{not json", check=False), "--chat")


def _tokens(lm, ids, n):
    from pipeline.run.lm import Generation

    result = Generation()
    for _ in lm.generate([ids], n, result=result):
        pass
    return [t for t in result.tokens[0] if t not in lm.eos_ids]


def test_chat_command_streams_resets_and_keeps_history(tiny_chat_export):
    """The chat command with its input piped: two turns, /system, /reset, a third turn, then end of input."""
    proc = onnxgen("chat", tiny_chat_export, "--max-new-tokens", "4", "--stats",
                   input="import os\ndef f():\n/system Be brief.\n/reset\n/bogus\n/systemd\nclass A:\n//usr/lib\n")
    err = proc.stderr
    assert err.count("turn ") == 4, err  # one line of stats per answer: /bogus and /systemd are not sent
    assert "reused 0" in err.splitlines()[-2]  # after /reset the cache starts over
    assert "system prompt set" in proc.stdout and "conversation reset" in proc.stdout
    assert "unknown command /bogus: /reset, /system TEXT" in err and "unknown command /systemd" in err


def test_a_changed_template_is_refused(tiny_chat_export, tmp_path):
    """The template is code the runtime runs (sandboxed): with verification on, an edited one is refused."""
    from pipeline.errors import UserError
    from pipeline.run.chat import ChatFormat
    from pipeline.run.lm import OnnxLM

    folder = tmp_path / "edited"
    shutil.copytree(tiny_chat_export, folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(UserError, match="sha256"):
        ChatFormat.of(OnnxLM(folder, fused=True, verify=True))
    assert ChatFormat.of(OnnxLM(folder, fused=True, verify=False)).render(MESSAGES)


def test_chat_in_a_terminal(tiny_chat_export):
    """The interactive command on a pseudo-terminal: the banner and prompt, an answer, Ctrl-C at the prompt
    keeps the session, /reset, and Ctrl-D ends it with exit 0."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from conftest import ROOT

    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "chat", str(tiny_chat_export), "--max-new-tokens",
                             "6", "--stats"], stdin=child, stdout=child, stderr=child, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(child)
    seen = b""

    def until(text: bytes, timeout=60):
        nonlocal seen
        deadline = time.time() + timeout
        while text not in seen:
            assert time.time() < deadline, seen.decode(errors="replace")
            if select.select([main], [], [], 0.5)[0]:
                seen += os.read(main, 4096)

    try:
        until(b"Ctrl-D quits")
        until(b"> ")
        os.write(main, b"import os\n")
        until(b"turn 1:")
        os.write(main, b"\x03")  # Ctrl-C at the prompt: the terminal sends SIGINT, the chat goes on
        os.write(main, b"def f():\n")
        until(b"turn 2:")
        assert b"reused" in seen
        os.write(main, b"/reset\n")
        until(b"conversation reset")
        os.write(main, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
