"""OpenAI-compatible HTTP front of the engine server (FastAPI on uvicorn, in a thread of the server process).

`POST /v1/completions`, `POST /v1/chat/completions` (n, temperature, top_p, max_tokens, stop,
logprobs, seed, stream over SSE; vLLM-style extensions: top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, include_stop_str_in_output, skip_special_tokens, and
`return_token_ids` for `prompt_token_ids` / `token_ids` / `weight_versions` in each choice),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). A request's `"model"` must be one of
the served names (`--served-model-name`, aliases allowed; absent: the first), or it gets a 404 as from
OpenAI and vLLM; responses carry the first name. Control: `POST /control/pause`
(`{"mode": "wait"|"abort"|"keep"}`), `/control/resume`, `/control/reset_prefix_cache`,
`/control/sleep` (`{"level": 1}`), `/control/wake_up` — these need the API key, and are off
without one. With an API key, generation needs it too (`Authorization: Bearer KEY`).
"""

import asyncio
import hmac
import itertools
import json
import logging
import socket
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from . import protocol

ACCESS_LOG = logging.getLogger("rollserve.access")
_USAGE = "rollserve.usage"  # where a generation request's scope holds its token counts for the access log

_EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
               "include_stop_str_in_output", "skip_special_tokens", "presence_penalty", "frequency_penalty", "seed")
_UNSUPPORTED = {"best_of": (None, 1), "echo": (None, False), "suffix": (None,), "logit_bias": (None, {}),
                "tools": (None, []), "response_format": (None,)}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def _error(status: int, message: str, param=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _sampling(body: dict, max_tokens_field: str, logprobs, default_max_tokens) -> dict:
    """SamplingParams fields of a request body (`default_max_tokens=None`: up to the end of the context)."""
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name, None) not in allowed:
            raise HTTPError(400, f"{name}={body[name]!r} is not supported by this server", name)
    params = {"n": body.get("n", 1), "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
              "max_tokens": body.get(max_tokens_field, body.get("max_tokens")),
              "stop": body.get("stop"), "logprobs": logprobs}
    params.update({k: body[k] for k in _EXTENSIONS if body.get(k) is not None})
    if params["max_tokens"] is None:
        params["max_tokens"] = default_max_tokens
    for name in ("n", "temperature", "top_p"):
        if params[name] is None:
            params[name] = {"n": 1, "temperature": 1.0, "top_p": 1.0}[name]
    return params


def _check_model(body: dict, names: tuple[str, ...]) -> None:
    model = body.get("model")
    if model is not None and model not in names:
        served = ", ".join(repr(n) for n in names)
        raise HTTPError(404, f"The model {model!r} does not exist: this server serves {served} (GET /v1/models)",
                        "model", kind="NotFoundError")


class _Tokens:
    """Token id -> its text, for logprobs (built once, on the core loop, which owns the tokenizer)."""

    def __init__(self, server):
        self.server, self.table = server, None

    async def get(self) -> list[str]:
        if self.table is None:
            tok = self.server.llm.tokenizer
            size = self.server.llm.logits_size
            build = (lambda: [tok.decode([i]) for i in range(size)]) if tok is not None else (
                lambda: [f"<{i}>" for i in range(size)])
            self.table = await asyncio.wrap_future(self.server.call(build))
        return self.table


def build_app(server) -> FastAPI:
    app = FastAPI(title="rollserve", docs_url=None, redoc_url=None)
    keys = itertools.count()
    tokens = _Tokens(server)

    def authorized(request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return server.api_key is not None and hmac.compare_digest(given.encode(), server.api_key.encode())

    def check_generation_key(request: Request):
        if server.api_key is not None and not authorized(request):
            raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > server.max_request_bytes:
            raise HTTPError(413, f"request body of {len(raw)} bytes exceeds max_request_bytes={server.max_request_bytes}")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    @app.exception_handler(HTTPError)
    async def on_http_error(request, exc: HTTPError):
        return _error(exc.status, str(exc), exc.param, exc.kind)

    async def submit(request: protocol.Generate):
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        send = lambda m: loop.call_soon_threadsafe(queue.put_nowait, m)  # noqa: E731
        key = ("http", next(keys))
        try:
            job = await asyncio.wrap_future(server.call(lambda: server.start_job(request, send, key)))
        except (ValueError, TypeError) as e:
            raise HTTPError(400, str(e)) from None
        return job, queue

    def abort(job) -> None:
        if job.remaining:
            server.call(lambda: server.abort_job(job))

    async def read_generation(request: Request) -> dict:
        check_generation_key(request)  # first: without the key, not even the served names are told
        body = await read_json(request)
        _check_model(body, server.model_names)
        return body

    async def run(request: Request, generate: protocol.Generate, shape):
        job, queue = await submit(generate)
        request.scope[_USAGE] = shape.usage
        table = await tokens.get() if shape.logprobs is not None else None
        if generate.stream:
            return StreamingResponse(_sse(job, queue, shape, table, abort), media_type="text/event-stream")
        try:
            msg = await queue.get()
        except asyncio.CancelledError:
            abort(job)
            raise
        if isinstance(msg, protocol.Error):
            return _error(500, msg.message, kind="server_error")
        return JSONResponse(shape.response(job, msg.outputs, table))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_generation(request)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise HTTPError(400, "prompt must be a string, a list of token ids, or a non-empty list of those", "prompt")
        logprobs = body.get("logprobs")
        generate = protocol.Generate(prompts=prompt, params=_sampling(body, "max_tokens", logprobs, 16),
                                     stream=bool(body.get("stream")))
        return await run(request, generate, _Shape("text_completion", server.model_names[0], body, logprobs))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_generation(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise HTTPError(400, "messages must be a non-empty list of message objects", "messages")
        logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        generate = protocol.Generate(conversations=[messages], stream=bool(body.get("stream")),
                                     params=_sampling(body, "max_completion_tokens", logprobs, None),
                                     chat_template_kwargs=body.get("chat_template_kwargs"))
        return await run(request, generate, _Shape("chat.completion", server.model_names[0], body, logprobs))

    @app.get("/v1/models")
    async def models(request: Request):
        check_generation_key(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "rollserve",
                                            "max_model_len": server.llm.max_model_len} for name in server.model_names]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "paused": server.paused, "weight_version": server.llm.weight_version}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(server.stats()), media_type="text/plain; version=0.0.4")

    async def control(request: Request, fn):
        if server.api_key is None:
            raise HTTPError(403, "control endpoints are off: start the server with --api-key", kind="permission_error")
        if not authorized(request):
            raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")
        body = await read_json(request) if await request.body() else {}
        try:
            await fn(body)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise HTTPError(400, str(e)) from None
        return {"status": "ok", "paused": server.paused, "weight_version": server.llm.weight_version}

    def on_core(fn):
        return lambda body: asyncio.wrap_future(server.call(lambda: fn(body)))

    async def pause(body):
        loop = asyncio.get_running_loop()
        paused = loop.create_future()
        done = lambda: loop.call_soon_threadsafe(lambda: paused.done() or paused.set_result(None))  # noqa: E731
        await asyncio.wrap_future(server.call(lambda: server.pause(body.get("mode", "wait"), done)))
        await paused

    routes = {"pause": pause, "resume": on_core(lambda body: server.resume()),
              "reset_prefix_cache": on_core(lambda body: server.llm.reset_prefix_cache()),
              "sleep": on_core(lambda body: server.sleep(body.get("level", 1))),
              "wake_up": on_core(lambda body: server.wake_up())}
    for name, fn in routes.items():
        app.add_api_route(f"/control/{name}", _endpoint(control, fn), methods=["POST"])
    return app


def _endpoint(control, fn):
    async def endpoint(request: Request):
        return await control(request, fn)
    return endpoint


class _Shape:
    """Builds OpenAI response objects (whole, or SSE chunks) from the server's output dicts."""

    def __init__(self, kind: str, model: str, body: dict, logprobs):
        self.chat, self.model, self.logprobs = kind == "chat.completion", model, logprobs
        self.kind = kind
        self.n = body.get("n") or 1
        self.return_ids = bool(body.get("return_token_ids"))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.usage: dict = {}  # filled once the response is complete (a stream: at its end, or when cut)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, job, outputs: list[dict], table) -> dict:
        choices = [self._choice(i, out, c, table, final=True) for i, out in enumerate(outputs) for c in out["outputs"]]
        completion = sum(len(c["token_ids"]) for out in outputs for c in out["outputs"])
        self.usage.update(_usage(job, completion))
        return {**self._head(self.kind), "choices": choices, "usage": self.usage}

    def chunk(self, i: int, c: dict, table) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                "choices": [self._choice(i, None, c, table, final=False)]}

    def _choice(self, i: int, out: dict | None, c: dict, table, final: bool) -> dict:
        text = c.get("text", "")
        choice = {"index": i * self.n + c["index"]}
        if not self.chat:
            choice["text"] = text
        elif final:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["delta"] = {"content": text} if text or not c.get("finish_reason") else {}
        choice["logprobs"] = self._logprobs(c, table) if self.logprobs is not None else None
        choice["finish_reason"] = c.get("finish_reason")
        if c.get("finish_reason"):
            choice["stop_reason"] = c.get("stop_reason")
        if self.return_ids:
            choice["token_ids"] = c["token_ids"]
            choice["weight_versions"] = c.get("weight_versions")
            if out is not None:
                choice["prompt_token_ids"] = out["prompt_token_ids"]
        return choice

    def _logprobs(self, c: dict, table) -> dict:
        ids, lps, tops = c["token_ids"], c.get("logprobs") or [], c.get("top_logprobs")
        if self.chat:
            content = []
            for k, (t, lp) in enumerate(zip(ids, lps)):
                best = sorted((tops[k] if tops else {}).items(), key=lambda kv: -kv[1])[:self.logprobs]
                content.append({"token": table[t], "logprob": lp, "bytes": list(table[t].encode()),
                                "top_logprobs": [{"token": table[a], "logprob": v, "bytes": list(table[a].encode())}
                                                 for a, v in best]})
            return {"content": content}
        tokens = [table[t] for t in ids]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
        top = [{table[a]: v for a, v in d.items()} for d in tops] if tops else [{tok: lp} for tok, lp in zip(tokens, lps)]
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def _usage(job, completion_tokens: int) -> dict:
    prompt = sum(len(p.token_ids) for p, _ in job.requests)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


async def _sse(job, queue, shape: _Shape, table, abort):
    completion = 0
    try:
        if shape.chat:
            for j in range(shape.n):
                head = shape._head("chat.completion.chunk")
                yield _event({**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
        while True:
            msg = await queue.get()
            if isinstance(msg, protocol.Error):
                yield _event({"error": {"message": msg.message, "type": "server_error", "code": 500}})
                return
            if isinstance(msg, protocol.Done):
                break
            for c in msg.outputs:
                completion += len(c["token_ids"])
                if c.get("text") or c.get("finish_reason") or shape.logprobs is not None or shape.return_ids:
                    yield _event(shape.chunk(msg.index, c, table))
        shape.usage.update(_usage(job, completion))
        if shape.include_usage:
            yield _event({**shape._head("chat.completion.chunk" if shape.chat else "text_completion"), "choices": [],
                          "usage": shape.usage})
        yield "data: [DONE]\n\n"
    finally:
        shape.usage.update(_usage(job, completion))
        abort(job)


class AccessLog:
    """ASGI middleware: one `rollserve.access` log line per HTTP request, once its response is sent (a stream:
    at its end), e.g. `127.0.0.1:51234 "POST /v1/completions" 200 prompt_tokens=5 completion_tokens=16 0.412s`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500 unless a response starts

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            ACCESS_LOG.info(_access_line(scope, status, time.perf_counter() - start))


def _access_line(scope, status: int, elapsed_s: float) -> str:
    host, port = scope.get("client") or ("-", 0)
    usage = scope.get(_USAGE)
    tokens = (f" prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}"
              if usage else "")
    return f'{host}:{port} "{scope["method"]} {scope["path"]}" {status}{tokens} {elapsed_s:.3f}s'


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


_METRICS = [
    ("rollserve_requests_total", "counter", "Finished requests by outcome.", None),
    ("rollserve_prompt_tokens_total", "counter", "Prompt tokens admitted.", "prompt_tokens"),
    ("rollserve_generation_tokens_total", "counter", "Tokens generated.", "generation_tokens"),
    ("rollserve_engine_steps_total", "counter", "Engine steps run.", "num_steps"),
    ("rollserve_num_requests_running", "gauge", "Sequences being decoded.", "num_running"),
    ("rollserve_num_requests_waiting", "gauge", "Sequences waiting (queue depth, incl. held while paused).",
     "num_waiting"),
    ("rollserve_kv_cache_usage_ratio", "gauge", "Share of KV-cache blocks in use.", "kv_cache_usage"),
    ("rollserve_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / looked up.",
     "prefix_cache_hit_rate"),
    ("rollserve_weight_version", "gauge", "Weight version being served.", "weight_version"),
    ("rollserve_paused", "gauge", "1 while generation is paused.", "paused"),
]


def _prometheus(stats: dict) -> str:
    lines = []
    for name, kind, help_text, field in _METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        if field is None:
            for outcome in ("ok", "aborted", "rejected"):
                lines.append(f'{name}{{outcome="{outcome}"}} {stats["requests_" + outcome]}')
        else:
            lines.append(f"{name} {float(stats[field])}")
    return "\n".join(lines) + "\n"


def start_http(server, host: str, port: int, access_log: bool = True):
    """Starts uvicorn in a daemon thread; returns (uvicorn server, "http://host:port") once it accepts."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind the HTTP front to {host}:{port}: {e}") from None
    sock.listen(2048)
    app = build_app(server)
    http = uvicorn.Server(uvicorn.Config(AccessLog(app) if access_log else app, log_level="warning",
                                         access_log=False, timeout_graceful_shutdown=2))  # ours, with tokens
    threading.Thread(target=http.run, kwargs={"sockets": [sock]}, name="rollserve-http", daemon=True).start()
    deadline = time.monotonic() + 60
    while not http.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the HTTP front did not start within 60 s")
        time.sleep(0.05)
    return http, f"http://{host}:{sock.getsockname()[1]}"
