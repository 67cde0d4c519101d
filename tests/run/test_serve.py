"""onnxgen serve through the official `openai` client: chat, completions, streaming, continuous batching
(every response equals its request run alone), bad input as OpenAI-shaped 4xx, 429 when full, a client
that disconnects frees its row, and one request's crash leaves the others alone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import ROOT

openai = pytest.importorskip("openai")

PROMPTS = ["import os", "def main(argv):", "class Foo(object):\n    ", "x = [", "from email import", "try:"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(folder, capacity=4, max_waiting=16, context=None, prefix_cache_bytes=0):
    """The server in this process, on a free loopback port: yields (client, server, base url)."""
    import uvicorn

    from pipeline.run.lm import OnnxLM
    from pipeline.run.serve import Server

    server = Server(OnnxLM(folder, fused=True, verify=True), "tiny", capacity=capacity, max_waiting=max_waiting,
                    context=context, prefix_cache_bytes=prefix_cache_bytes)
    port = _free_port()
    http = uvicorn.Server(uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not http.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60), server, url
    finally:
        http.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def served(tiny_chat_export):
    with running(tiny_chat_export) as s:
        yield s


def _alone(lm, ids, max_tokens, temperature=0.0, top_p=1.0, seed=None, stop=None):
    """What the request gives run by itself through OnnxLM's own loop."""
    from pipeline.run.lm import Generation
    from pipeline.run.sampling import SamplingConfig
    from pipeline.run.text import cut_at_stop

    sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
    result = Generation()
    for _ in lm.generate([ids], max_tokens, sampling, result=result, stop=stop):
        pass
    tokens = [t for t in result.tokens[0] if t not in lm.eos_ids]
    return cut_at_stop(lm.tokenizer.decode(tokens), stop)


def _post(url, body: bytes | str):
    request = urllib.request.Request(url, data=body.encode() if isinstance(body, str) else body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_export(served):
    client, server, _ = served
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7)])
def test_chat_completion_equals_the_request_run_alone(served, sampling):
    client, server, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "import os"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **sampling)
    want = _alone(server.lm, server.chat.encode(messages), 12, **sampling)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(server.chat.encode(messages)) and r.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **sampling)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_whole_and_streamed(served):
    client, server, _ = served
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.7, seed=3)
        want = _alone(server.lm, server.lm.encode(prompt), 10, temperature=0.7, seed=3)
        assert r.choices[0].text == want and r.object == "text_completion"
        pieces = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.7, seed=3,
                                           stream=True)
        assert "".join(c.choices[0].text for c in pieces) == want


def test_concurrent_requests_each_equal_their_run_alone(served):
    """More requests than rows, of different lengths, sampling and stops: they join and leave the running
    batch at different steps, and each still gets what it gets alone."""
    client, server, _ = served
    jobs = []
    for i in range(12):
        prompt = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
        jobs.append(dict(prompt=prompt, max_tokens=5 + 3 * i, temperature=[0.0, 0.8, 1.3][i % 3],
                         top_p=[1.0, 0.9][i % 2], seed=100 + i, stop=["\n\n"] if i % 4 == 1 else None))

    def call(job):
        if job is jobs[5]:  # one streams
            return "".join(c.choices[0].text for c in client.completions.create(model="tiny", stream=True, **job))
        return client.completions.create(model="tiny", **job).choices[0].text

    steps = server.engine.steps
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, jobs))
    for job, text in zip(jobs, got):
        job = dict(job)
        assert text == _alone(server.lm, server.lm.encode(job.pop("prompt")), **job), job
    assert server.engine.steps - steps < sum(j["max_tokens"] for j in jobs)  # rows did share steps


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "tiny", "prompt": "x"', 400, None),                                  # malformed JSON
    ('[1, 2]', 400, None),
    ('{"model": "gpt-4", "prompt": "x"}', 404, "model"),
    ('{"prompt": "x"}', 400, "model"),
    ('{"model": "tiny", "prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "x", "temperature": 2.5}', 400, "temperature"),
    ('{"model": "tiny", "prompt": "x", "temperature": -1}', 400, "temperature"),
    ('{"model": "tiny", "prompt": "x", "top_p": 1.5}', 400, "top_p"),
    ('{"model": "tiny", "prompt": "x", "seed": -3}', 400, "seed"),
    ('{"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ('{"model": "tiny", "prompt": "x", "n": 2}', 400, "n"),
    ('{"model": "tiny", "prompt": 12}', 400, "prompt"),
    ('{"model": "tiny", "prompt": ""}', 400, "prompt"),
    ('{"model": "tiny", "prompt": [1, 999999]}', 400, "prompt"),
    ('{"model": "tiny", "prompt": "' + "x = 1\\n" * 200 + '"}', 400, "prompt"),      # over the context
    ('{"model": "tiny", "prompt": "x", "max_tokens": 500}', 400, "prompt"),           # prompt + max_tokens over it
])
def test_bad_completions_get_openai_errors(served, body, status, param):
    client, server, url = served
    code, reply = _post(f"{url}/completions", body)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason  # still serving


def test_bad_chat_requests_raise_in_the_client(served):
    client, server, url = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "user"}], "hi"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x = 1\n" * 200}])
    # what would change the answer is refused, not ignored; what restates the default is accepted
    hi = [{"role": "user", "content": "hi"}]
    for extra, param in ((dict(response_format={"type": "xml"}), "response_format"),
                         (dict(logit_bias={"5": 100}), "logit_bias"),
                         (dict(tool_choice="required"), "tool_choice")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=hi, max_tokens=2, **extra)
        assert e.value.body["param"] == param
    assert client.chat.completions.create(model="tiny", messages=hi, max_tokens=2, response_format={"type": "text"},
                                          logit_bias={}, tool_choice="none").choices[0].finish_reason
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, best_of=3)
    code, reply = _post(f"{url}/chat/completions", b"\xff\xfe not json")
    assert code == 400 and reply["error"]["type"] == "invalid_request_error"
    assert _post(f"{url}/nowhere", "{}")[0] == 404


def test_a_full_server_answers_429_and_recovers(tiny_chat_export):
    with running(tiny_chat_export, capacity=1, max_waiting=1) as (client, server, url):
        streams = [client.completions.create(model="tiny", prompt="import os", max_tokens=100, stream=True)
                   for _ in range(2)]  # one running, one waiting
        next(iter(streams[0]))
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        for s in streams:
            assert "".join(c.choices[0].text for c in s)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None


def test_a_client_that_disconnects_frees_its_row(served):
    client, server, url = served
    stream = client.completions.create(model="tiny", prompt="import os", max_tokens=110, stream=True)
    next(iter(stream))
    stream.close()  # hang up mid-answer
    deadline = time.time() + 10
    while server.engine.load()["running"]:
        assert time.time() < deadline, server.engine.load()
        time.sleep(0.02)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def test_a_crash_in_one_request_leaves_the_others(served, monkeypatch):
    """A request whose text handling raises (a stand-in for any bug in one row) gets a 500; the rows beside
    it finish with their own tokens and the server keeps serving."""
    from pipeline.run import batching

    client, server, url = served

    class Exploding(batching.CompletionText):
        def push(self, token):
            if "BOOM" in self.stop:
                raise RuntimeError("boom")
            return super().push(token)

    monkeypatch.setattr(batching, "CompletionText", Exploding)
    jobs = [dict(prompt=p, max_tokens=20, temperature=0.8, seed=s, stop=["BOOM"] if s == 666 else None)
            for p, s in zip(PROMPTS, [1, 666, 2, 3])]

    def call(job):
        try:
            return client.completions.create(model="tiny", **job).choices[0].text
        except openai.InternalServerError as e:
            return e
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, jobs))
    assert isinstance(got[1], openai.InternalServerError) and "boom" in str(got[1])
    for job, text in zip(jobs, got):
        if job["seed"] != 666:
            job = dict(job)
            assert text == _alone(server.lm, server.lm.encode(job.pop("prompt")), **job)
    monkeypatch.undo()
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def test_a_kv_cache_smaller_than_the_context_bounds_requests(tiny_chat_export):
    """Rows of the shared cache hold 32 positions: /v1/models says so, a request that needs 33 gets
    OpenAI's context error, one that fits runs to its length and equals its run alone."""
    with running(tiny_chat_export, capacity=2, context=32) as (client, server, url):
        assert server.engine.cache[0].shape[2] == 32 and server.lm.n_ctx > 32
        with urllib.request.urlopen(f"{url}/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["context_length"] == 32
        ids = server.lm.encode("import os\nimport sys\n")
        code, reply = _post(f"{url}/completions", json.dumps(
            {"model": "tiny", "prompt": ids, "max_tokens": 33 - len(ids), "temperature": 0}))
        assert code == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        assert "maximum context length is 32 tokens" in reply["error"]["message"]
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=32 - len(ids), temperature=0)
        assert r.choices[0].text == _alone(server.lm, ids, max_tokens=32 - len(ids), temperature=0)


def test_kv_context_is_what_the_memory_holds(tiny_chat_export):
    from pipeline.run.batching import kv_context
    from pipeline.run.lm import OnnxLM

    lm = OnnxLM(tiny_chat_export, fused=True)
    per_position = len(lm.past_names) * lm.n_kv_heads * lm.head_dim * 4
    assert kv_context(lm, 4, 1e12) == lm.n_ctx
    assert kv_context(lm, 4, 4 * per_position * 10 + 1) == 10
    assert kv_context(lm, 4, per_position) == 0
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", str(tiny_chat_export), "--kv-cache-gb",
                           "1e-9"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--kv-cache-gb 1e-09: holds 0 position(s)" in proc.stderr


def test_the_serve_command(tiny_chat_export, tmp_path):
    """`onnxgen serve` as a user starts it: answers on the port it was given, stops on SIGINT. The model's name
    is the folder's as the user named it: a link `latest` serves `latest`, not the name of what it points at."""
    port = _free_port()
    (tmp_path / "latest").symlink_to(tiny_chat_export)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(tmp_path / "latest") + "/", "--port",
                             str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.time() + 60
        while True:
            try:
                assert [m.id for m in client.models.list()] == ["latest"]
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
                time.sleep(0.2)
        r = client.chat.completions.create(model="latest", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()


# ----------------------------------------------------------------------------- prefix caching

def _engine_answers(engine, jobs: list[dict]) -> list:
    """Submit every job at once to a running engine; each job's finished Request, in order."""
    from pipeline.run.batching import Request
    from pipeline.run.sampling import SamplingConfig

    done = threading.Semaphore(0)
    requests = []
    for job in jobs:
        sampling = SamplingConfig(temperature=job.get("temperature", 0.0), top_p=job.get("top_p", 1.0),
                                  seed=job.get("seed"))
        requests.append(Request(prompt=job["ids"], max_tokens=job["max_tokens"], sampling=sampling,
                                emit=lambda kind, data: kind != "text" and done.release()))
    for r in requests:
        assert engine.submit(r)
    for _ in requests:
        assert done.acquire(timeout=60)
    assert all(r.finish_reason in ("stop", "length") for r in requests), [r.finish_reason for r in requests]
    return requests


def _alone_tokens(lm, ids, max_tokens, temperature=0.0, top_p=1.0, seed=None):
    from pipeline.run.lm import Generation
    from pipeline.run.sampling import SamplingConfig

    result = Generation()
    for _ in lm.generate([ids], max_tokens, SamplingConfig(temperature=temperature, top_p=top_p, seed=seed),
                         result=result):
        pass
    return result.tokens[0]


SYSTEM = "You are a careful assistant. Answer in Python.\nimport os\nimport sys\nimport json\n\n"


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95)])
def test_prefix_cache_answers_equal_their_runs_alone(tiny_chat_export, sampling):
    """Requests sharing a prefix with one already prefilled copy its K/V and prefill only the rest; one whose
    whole prompt is cached still prefills its last token; they decode beside rows that copied nothing, and every
    answer is the tokens of its run alone."""
    from pipeline.run.batching import BatchEngine
    from pipeline.run.lm import OnnxLM

    lm = OnnxLM(tiny_chat_export, fused=True)
    system = lm.encode(SYSTEM)
    assert len(system) >= 32, len(system)
    head = system[:32]  # two 16-token blocks
    engine = BatchEngine(lm, capacity=4, prefix_cache_bytes=1e9, prefix_block=16).start()
    try:
        first = [dict(ids=head + lm.encode("def main(argv):"), max_tokens=12, seed=1, **sampling)]
        [r] = _engine_answers(engine, first)
        assert r.cached == 0 and engine.load()["prefix_cache"]["blocks"] == 2
        jobs = [dict(ids=head + lm.encode(tail), max_tokens=10 + 3 * i, seed=10 + i, **sampling)
                for i, tail in enumerate(["class Foo(object):\n    ", "x = [", "try:"])]
        jobs.append(dict(ids=list(head), max_tokens=9, seed=20, **sampling))         # all of it cached
        jobs.append(dict(ids=lm.encode("from email import message\n"), max_tokens=14, seed=21, **sampling))  # none
        jobs.append(dict(ids=head[:16] + lm.encode(" = 1\n"), max_tokens=8, seed=22, **sampling))  # one block
        got = _engine_answers(engine, jobs)
        assert [r.cached for r in got] == [32, 32, 32, 31, 0, 16]
        for job, r in zip(first + jobs, [*_engine_answers(engine, first), *got]):
            job = dict(job)
            assert r.tokens == _alone_tokens(lm, job.pop("ids"), **job), job
        stats = engine.load()["prefix_cache"]
        assert stats["hits"] == 6 and stats["hit_tokens"] == 32 * 4 + 31 + 16 and stats["evictions"] == 0
    finally:
        engine.stop()


def test_prefix_cache_continued_prefill_gives_the_logits_of_a_whole_one(tiny_chat_export):
    """The logits after a prompt whose prefix was copied (its last token alone, or several) are those of the
    whole prompt prefilled at once, to float32 rounding: the copied K/V are the ones the prompt would make."""
    from pipeline.run.batching import BatchEngine, Request
    from pipeline.run.lm import OnnxLM
    from pipeline.run.sampling import SamplingConfig

    lm = OnnxLM(tiny_chat_export, fused=True)
    head = lm.encode(SYSTEM)[:32]
    engine = BatchEngine(lm, capacity=3, prefix_cache_bytes=1e9, prefix_block=16)  # not started: driven here
    for slot, (prompt, cached) in enumerate(((head + lm.encode("x = ["), 0), (head + lm.encode("try:"), 32),
                                             (head, 31))):
        r = Request(prompt=prompt, max_tokens=4, sampling=SamplingConfig(temperature=0.0), emit=None)
        r.slot, engine.rows[slot] = slot, r
        engine._admit(r)
        assert r.cached == cached
        np.testing.assert_allclose(engine.out[slot, 0], lm.start([prompt], 1).logits[0], rtol=0, atol=1e-5)


def test_prefix_cache_off_adds_nothing(tiny_chat_export):
    """--prefix-cache-gb 0: no cache, nothing copied, nothing reported, the same answers."""
    from pipeline.run.batching import BatchEngine
    from pipeline.run.lm import OnnxLM

    lm = OnnxLM(tiny_chat_export, fused=True)
    engine = BatchEngine(lm, capacity=2, prefix_cache_bytes=0, prefix_block=16).start()
    try:
        ids = lm.encode(SYSTEM)[:32] + lm.encode("x = [")
        jobs = [dict(ids=ids, max_tokens=10, temperature=0.8, seed=5)] * 2
        got = _engine_answers(engine, jobs[:1]) + _engine_answers(engine, jobs[1:])
        assert engine.prefix is None and "prefix_cache" not in engine.load()
        assert [r.cached for r in got] == [0, 0]
        want = _alone_tokens(lm, ids, 10, temperature=0.8, seed=5)
        assert all(r.tokens == want for r in got)
    finally:
        engine.stop()


def test_prefix_cache_evicts_least_recently_used_under_its_bound(tiny_chat_export):
    """Room for 3 blocks: a third 2-block prompt evicts the least recently used prompt's blocks, deepest first,
    the memory never passes the bound, and answers after eviction still equal their runs alone."""
    from pipeline.run.batching import BatchEngine
    from pipeline.run.lm import OnnxLM
    from pipeline.run.prefix_cache import PrefixCache

    lm = OnnxLM(tiny_chat_export, fused=True)
    bound = 3 * PrefixCache(lm, 0, block=16).block_bytes + 1
    engine = BatchEngine(lm, capacity=2, prefix_cache_bytes=bound, prefix_block=16).start()
    try:
        base = lm.encode(SYSTEM)
        a, b = base[:32], base[1:33]
        c = lm.encode("def parse_args(argv=None):\n    " * 3)[:32]
        tail = lm.encode("x = [")
        ask = lambda p: _engine_answers(engine, [dict(ids=p + tail, max_tokens=6)])[0]  # noqa: E731
        assert ask(a).cached == 0 and ask(b).cached == 0     # 4 blocks for 3: a's second block goes
        stats = engine.load()["prefix_cache"]
        assert stats["blocks"] == 3 and stats["evictions"] == 1 and stats["bytes"] < bound
        assert ask(a).cached == 16                           # its first block stayed; its second evicts b's
        ask(c)                                               # 2 more: b's last block, then a's leaf go
        stats = engine.load()["prefix_cache"]
        assert stats["evictions"] == 4 and stats["blocks"] == 3
        for p, cached in ((c, 32), (a, 16), (b, 0)):
            r = ask(p)
            assert r.cached == cached and r.tokens == _alone_tokens(lm, p + tail, 6)
        assert engine.load()["prefix_cache"]["bytes"] < bound
    finally:
        engine.stop()


def test_prefix_cache_on_health_and_the_command_line(tiny_chat_export):
    with running(tiny_chat_export, prefix_cache_bytes=1e8) as (client, server, url):
        prompt = SYSTEM * 2
        for _ in range(2):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=3)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
            stats = json.loads(r.read())["prefix_cache"]
        assert stats["hits"] == 1 and stats["blocks"] == len(server.lm.encode(prompt)) // 64
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", str(tiny_chat_export), "--prefix-cache-gb",
                           "-1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--prefix-cache-gb -1.0: expected 0 (off) or more" in proc.stderr
