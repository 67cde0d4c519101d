"""`onnxgen serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    onnxgen serve exports/default --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "default", "messages": [{"role": "user", "content": "hi"}]}'

/v1/chat/completions, /v1/completions and /v1/models, with `stream: true` as server-sent events;
max_tokens, temperature, top_p, stop and seed; response_format (json_object, json_schema), and on chat tools,
tool_choice and parallel_tool_calls (run/tools.py), decoded under llguidance (run/guidance.py). A request the
batch and its queue cannot take gets 429; a bad one gets a 4xx with OpenAI's error shape ({"error": {"message",
"type", "param", "code"}}); a failure inside one request is that request's 500, and the server goes on.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager

from pipeline.errors import UserError
from pipeline.run.batching import BatchEngine, Request
from pipeline.run.chat import ChatFormat, check_messages
from pipeline.run.sampling import SamplingConfig
from pipeline.run.tools import ToolPlan, response_format_constraint

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, lo: float, hi: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, f"{name}: {value!r} is not a number in [{lo:g}, {hi:g}]", name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, lo: int | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        raise ApiError(400, f"{name}: {value!r} is not an integer{f' >= {lo}' if lo is not None else ''}",
                       name, "invalid_value")
    return value


# Parameters this server does not implement: (the values that ask nothing of it, the first standing in for an
# absent one; what the 400 says). Any other value would change what comes back, so it is refused, never ignored
# (a client asking for JSON output or a token bias must not get plain text as if it had been honoured).
UNIMPLEMENTED = {
    "n": ((1,), "only 1 is supported"),
    **{name: ((None, 0, 0.0), "not supported (only 0)") for name in ("frequency_penalty", "presence_penalty")},
    **{name: ((None, False, 0, [], {}), "not supported")
       for name in ("logprobs", "echo", "top_logprobs", "functions", "suffix", "logit_bias")},
    "best_of": ((None, 1), "only 1 is supported"),
    "function_call": ((None, "none"), 'only "none" is supported (the deprecated functions API: use tools)'),
}


class Server:
    """What the routes share: the model, its name, its chat format and the engine."""

    def __init__(self, lm, name: str, capacity: int = 16, max_waiting: int = 64, context: int | None = None,
                 prefix_cache_bytes: float = 0):
        self.lm, self.name = lm, name
        try:
            self.chat = ChatFormat.of(lm)
        except UserError:
            self.chat = None  # /v1/chat/completions says so; /v1/completions still works
        self.engine = BatchEngine(lm, capacity=capacity, max_waiting=max_waiting, deliver=self._deliver,
                                  context=context, prefix_cache_bytes=prefix_cache_bytes)
        self.loop = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ requests
    def parse(self, body, chat: bool) -> tuple[Request, dict]:
        """A validated request (not yet submitted) and what the response needs to say."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "model: required (a string; GET /v1/models lists them)", "model", "invalid_value")
        if model != self.name:
            raise ApiError(404, f"The model `{model}` does not exist (this server has `{self.name}`)", "model",
                           "model_not_found")
        for name, (allowed, what) in UNIMPLEMENTED.items():
            if body.get(name, allowed[0]) not in allowed:
                raise ApiError(400, f"{name}: {what}", name, "invalid_value")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream: expected true or false", "stream", "invalid_value")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = _integer(body, "seed")
        if seed is not None and not 0 <= seed < 2 ** 63:
            raise ApiError(400, f"seed: {seed} is not in [0, 2^63)", "seed", "invalid_value")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name, lo=1)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
            raise ApiError(400, "stop: expected a string or a list of at most 4 strings", "stop", "invalid_value")

        stop_ids: tuple[int, ...] = ()
        plan = None
        try:
            constraint = response_format_constraint(body.get("response_format"))
        except UserError as e:
            raise ApiError(400, str(e), "response_format", "invalid_value") from None
        if chat:
            if self.chat is None:
                raise ApiError(400, f"model `{self.name}` has no chat template: use /v1/completions", "model",
                               "no_chat_template")
            try:
                messages = check_messages(body.get("messages"))
            except UserError as e:
                raise ApiError(400, str(e), "messages", "invalid_value") from None
            plan = self._tool_plan(body, constraint, messages)
            try:
                if plan is None:
                    ids = self.chat.encode(messages)
                else:
                    ids = self.chat.encode(plan.messages(messages), tools=plan.template_tools)
                    constraint = plan.constraint or constraint
            except UserError as e:
                raise ApiError(400, str(e), "messages", "invalid_value") from None
            stop_ids = tuple(self.chat.stop_ids())
        else:
            for name in ("tools", "tool_choice", "parallel_tool_calls"):
                if body.get(name) is not None:
                    raise ApiError(400, f"{name}: only on /v1/chat/completions", name, "invalid_value")
            ids = self._prompt_ids(body.get("prompt"))
        n_ctx = self.engine.L  # the model's context, or what the KV cache's memory holds
        if not ids:
            raise ApiError(400, "the prompt is empty (expected at least one token)", "prompt" if not chat else "messages")
        if max_tokens is None:
            max_tokens = n_ctx - len(ids) if chat else 16  # OpenAI's defaults: to the context; 16
        if len(ids) + max_tokens > n_ctx or len(ids) >= n_ctx:
            raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                           f"{len(ids) + max_tokens} tokens ({len(ids)} in the {'messages' if chat else 'prompt'}, "
                           f"{max_tokens} in the completion).", "messages" if chat else "prompt",
                           "context_length_exceeded")
        if temperature == 0 or top_p == 0:
            sampling = SamplingConfig(temperature=0.0, seed=seed)  # top_p 0 keeps only the likeliest token
        else:
            sampling = SamplingConfig(temperature=temperature, top_p=top_p, seed=seed)
        request = Request(prompt=list(ids), max_tokens=max_tokens, sampling=sampling, emit=None, stop=stop,
                          stop_ids=stop_ids, constraint=constraint)
        options = body.get("stream_options") or {}
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return request, {"stream": stream, "usage_in_stream": usage, "tools": plan}

    def _tool_plan(self, body: dict, constraint, messages: list[dict]) -> ToolPlan | None:
        """The request's tools (None when it has none, nor tool calls in its history); each mistake a 400 naming
        its parameter."""
        try:
            plan = ToolPlan.of(body, self.chat, messages)
        except UserError as e:
            param = re.match(r"\w+", str(e)).group(0)  # tools.py's messages start with the parameter's name
            raise ApiError(400, str(e), param, "invalid_value") from None
        if plan is not None and plan.constraint is not None and constraint is not None:
            raise ApiError(400, "response_format: not with tools (give tool_choice \"none\" for a structured answer)",
                           "response_format", "invalid_value")
        return plan

    def _answer(self, r: Request, content: str, plan: ToolPlan | None) -> tuple[dict, str]:
        """The chat message and finish_reason: the tool calls the answer makes, when tools were offered."""
        if plan is None or not plan.calls:
            return {"role": "assistant", "content": content}, r.finish_reason
        eos = set(int(i) for i in self.lm.eos_ids) | set(r.stop_ids)
        raw = self.lm.tokenizer.decode([t for t in r.tokens if t not in eos], skip_special_tokens=False)
        text, calls = plan.parse(raw)
        if not calls:
            return {"role": "assistant", "content": content if plan.format != "generic" else text}, r.finish_reason
        reason = "tool_calls" if r.finish_reason == "stop" else r.finish_reason
        return {"role": "assistant", "content": text, "tool_calls": calls}, reason

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            try:
                return self.lm.encode(prompt)
            except Exception:
                raise ApiError(400, "prompt: not UTF-8 text", "prompt", "invalid_value") from None
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.lm.vocab_size for t in prompt):
                raise ApiError(400, f"prompt: token ids must be in [0, {self.lm.vocab_size})", "prompt", "invalid_value")
            return prompt
        raise ApiError(400, "prompt: expected a string, a list of one string, or a list of token ids", "prompt",
                       "invalid_value")

    # ------------------------------------------------------------------ the app
    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        async def models(request):
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        async def model(request):
            if request.path_params["name"] != self.name:
                return self._error(ApiError(404, f"The model `{request.path_params['name']}` does not exist",
                                            "model", "model_not_found"))
            return JSONResponse(self._model_card())

        async def health(request):
            return JSONResponse({"status": "ok", **self.engine.load()})

        def completion_route(chat: bool):
            async def handle(request):
                try:
                    try:
                        body = json.loads(await request.body())
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
                    r, options = self.parse(body, chat)
                except ApiError as e:
                    return self._error(e)
                events = asyncio.Queue()
                r.emit = lambda kind, data: events.put_nowait((kind, data))  # on the loop: see _deliver
                if not self.engine.submit(r):
                    return self._error(ApiError(429, "the server is at capacity (batch and queue full); retry later",
                                                None, "rate_limit_exceeded", "requests"))
                meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                        "model": self.name}
                if options["stream"]:
                    sse = self._sse(r, events, meta, chat, options["usage_in_stream"], options["tools"])
                    return StreamingResponse(sse, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
                return await self._whole(request, r, events, meta, chat, options["tools"])
            return handle

        async def not_found(request, exc):
            return self._error(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                        f"{'no such route' if exc.status_code == 404 else exc.detail}"))

        async def crashed(request, exc):
            log.exception("request failed", exc_info=exc)
            return self._error(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

        routes = [Route("/v1/models", models), Route("/v1/models/{name:path}", model), Route("/health", health),
                  Route("/v1/chat/completions", completion_route(True), methods=["POST"]),
                  Route("/v1/completions", completion_route(False), methods=["POST"])]
        @asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
            self.engine.start()
            yield
            self.engine.stop()

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, Exception: crashed},
                         lifespan=lifespan)

    def _deliver(self, events: list) -> None:
        """From the engine thread: a phase's results, handed to the event loop in one call."""
        def put():
            for r, kind, data in events:
                r.emit(kind, data)
        self.loop.call_soon_threadsafe(put)

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "onnxgen",
                "context_length": self.engine.L}

    @staticmethod
    def _error(e: ApiError):
        from starlette.responses import JSONResponse

        return JSONResponse(e.body(), status_code=e.status)

    def _usage(self, r: Request) -> dict:
        return {"prompt_tokens": len(r.prompt), "completion_tokens": len(r.tokens),
                "total_tokens": len(r.prompt) + len(r.tokens)}

    async def _whole(self, http, r: Request, events: asyncio.Queue, meta: dict, chat: bool, plan=None):
        from starlette.responses import JSONResponse

        text = []
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    text.append(data)
                elif kind == "error":
                    return self._error(ApiError(500, data, type="server_error"))
                else:
                    break
        finally:
            if not r.finish_reason:
                self.engine.cancel(r)  # the client went away (or this task was cancelled): free the row
        content = "".join(text)
        if chat:
            message, reason = self._answer(r, content, plan)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": r.finish_reason}
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": self._usage(r)})

    async def _sse(self, r: Request, events: asyncio.Queue, meta: dict, chat: bool, usage: bool, plan=None):
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, finish=None, **extra) -> str:
            if chat:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**meta, 'object': kind_name, 'choices': [choice], **extra}, ensure_ascii=False)}\n\n"

        # a piece of text is one chunk per token per client: its JSON around the text is made once
        head, _, tail = chunk({"content": "\0"} if chat else "\0").partition('"\\u0000"')

        def text_chunk(piece: str) -> str:
            return head + json.dumps(piece, ensure_ascii=False) + tail

        held: list[str] = []
        shown = plan.text_stream() if plan is not None and plan.calls else None  # text before a call, streamed
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            finished = False
            while not finished:
                ready = [await events.get()]
                while not events.empty():  # a client that lags gets what piled up in one write
                    ready.append(events.get_nowait())
                out = []
                for kind, data in ready:
                    if kind == "text" and plan is not None and plan.calls:  # the answer is parsed once complete
                        held.append(data)
                        piece = shown.push(data) if shown is not None else ""
                        if piece:
                            out.append(text_chunk(piece))
                    elif kind == "text":
                        out.append(text_chunk(data))
                    elif kind == "error":
                        out.append(f"data: {json.dumps(ApiError(500, data, type='server_error').body())}\n\n")
                        finished = True
                        break
                    else:
                        finish = r.finish_reason
                        if plan is not None and plan.calls:
                            message, finish = self._answer(r, "".join(held), plan)
                            if shown is not None:  # its text went out as it came
                                message = {**message, "content": None if message.get("tool_calls") else shown.rest()}
                            out.extend(chunk(delta) for delta in _tool_deltas(message))
                        out.append(chunk({} if chat else "", finish=finish))
                        if usage:
                            out.append(f"data: {json.dumps({**meta, 'object': kind_name, 'choices': [], 'usage': self._usage(r)})}\n\n")
                        finished = True
                        break
                yield "".join(out)
            yield "data: [DONE]\n\n"
        finally:
            if not r.finish_reason:
                self.engine.cancel(r)  # the client disconnected mid-stream: its row goes back


def _tool_deltas(message: dict) -> list[dict]:
    """A whole answer as stream deltas: its text, then each call (its index, id and name, then its arguments)."""
    deltas = [{"content": message["content"]}] if message.get("content") else []
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call["function"]
        deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                       "function": {"name": fn["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
    return deltas


def serve(lm, name: str, host: str = "127.0.0.1", port: int = 8000, capacity: int = 16, max_waiting: int = 64,
          context: int | None = None, prefix_cache_bytes: float = 0, log_level: str = "warning") -> None:
    import uvicorn

    server = Server(lm, name, capacity=capacity, max_waiting=max_waiting, context=context,
                    prefix_cache_bytes=prefix_cache_bytes)
    uvicorn.run(server.app(), host=host, port=port, log_level=log_level)
