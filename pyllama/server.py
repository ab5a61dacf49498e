"""`pyllama serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    app = build_app("model.gguf", parallel=4, ctx_size=2048, api_key=None, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8080)          # what `pyllama serve` does

build_app(model_or_path, **options) -> ASGI app is the stable entry point (pyllama.ray wraps it
in Ray Serve); its keywords are SERVE_OPTIONS below. The app owns an Engine (app.state.engine,
closed when the ASGI lifespan ends) and a Llama for text (app.state.llama): every request is a
pyllama.completion.Completion, the object Llama.create_completion drives, here driven by the
engine as the request's policy, so a request gives the same text from Python and over HTTP.

Why Starlette + uvicorn: Starlette is small (one dependency, anyio), well kept, and has what an
OpenAI-style API needs (routing, JSON, server-sent events through StreamingResponse, lifespan);
FastAPI would add pydantic models whose validation would be a second copy of pyllama/validate.py.
uvicorn is the reference ASGI server. Both are the optional extra `pyllama[server]`.

Routes: POST /v1/completions, POST /v1/chat/completions (stream: true gives `data: {...}` events
ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus text). Errors
have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for malformed JSON and
unknown or invalid fields (param names the field) and for a prompt too long for the context, 401
for a missing or wrong key (with api_key; /health stays open), 413 for a body over max_body
bytes, 415 for a body that is not application/json, 503 with Retry-After when the queue is full.
"""
import asyncio
import contextlib
import hmac
import json
import logging
import re
import time

from . import validate as V
from .chat import ChatShape, chat_request
from .completion import MAX_LOGPROBS, Completion, TextShape
from .errors import BusyError, ParameterError, PyllamaError

log = logging.getLogger("pyllama.server")

SERVE_OPTIONS = dict(parallel=4, ctx_size=None, threads=None, api_key=None, max_queue=64,
                     tokenizer=None, chat_template=None, max_body=1 << 20, model_name=None)
DEFAULT_CTX = 4096  # ctx_size None: the model's context, at most this (each slot holds one)
SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
            "repeat_last_n", "frequency_penalty", "presence_penalty", "logit_bias", "stop",
            "stop_token_ids", "seed"}
COMMON = SAMPLING | {"model", "stream", "stream_options", "n", "user"}
FIELDS = {"/v1/completions": COMMON | {"prompt", "logprobs", "echo"},
          "/v1/chat/completions": COMMON | {"messages", "logprobs", "top_logprobs",
                                            "max_completion_tokens"}}


class HTTPError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _bad_argument(e, fields, prompt_field):
    """A ParameterError as a 400 naming the field its message starts with."""
    msg = str(e)
    m = re.match(r"([a-z_]+)", msg)
    if msg.startswith("the prompt") and "context" in msg:  # (context_shift is not served)
        return HTTPError(400, msg.split(" (lower")[0] + " (lower max_tokens or shorten the prompt)",
                         prompt_field, "context_length_exceeded")
    if msg.startswith("the prompt"):
        return HTTPError(400, msg, prompt_field, "invalid_value")
    return HTTPError(400, msg, m.group(1) if m and m.group(1) in fields else None, "invalid_value")


class Server:
    """The app's state: the model, the engine, the counters; the route handlers."""

    def __init__(self, model, parallel, ctx_size, threads, api_key, max_queue, tokenizer,
                 chat_template, max_body, model_name):
        from .engine import Engine
        from .formats import load
        from .llama import Llama
        self.api_key = V.optional(V.text, api_key, "api_key")
        self.max_body = V.integer(max_body, "max_body", lo=1)
        self.own_llama = not isinstance(model, Llama)
        if self.own_llama:
            mf = load(model)
            ctx_size = min(mf.config["seq_len"], DEFAULT_CTX) if ctx_size is None else ctx_size
            # text only (tokenizer, templates): the engine runs the model, so a 1-position cache here
            self.llama = Llama(mf, tokenizer=tokenizer, threads=threads, n_ctx=1, chat_template=chat_template)
        else:
            self.llama = model
            ctx_size = model.n_ctx if ctx_size is None else ctx_size
        self.llama._tok()  # a server without a tokenizer cannot take text: say so at start
        ctx_size = V.integer(ctx_size, "ctx_size", lo=2)
        self.engine = Engine(self.llama, slots=V.integer(parallel, "parallel", lo=1), n_ctx=ctx_size,
                             threads=threads, max_queue=max_queue)
        self.model_name = V.text(model_name, "model_name") if model_name is not None else \
            str(self.llama.path).replace("\\", "/").rsplit("/", 1)[-1]
        self.requests = {}  # (route, status) -> count
        self.tokens = dict(prompt=0, generated=0)
        self.started = time.time()
        self._rate = [(time.monotonic(), 0)]

    def close(self):
        self.engine.close()
        if self.own_llama:
            self.llama.close()

    # -- the outer layer: key, one log line, request counts ----------------------------------------
    async def __call__(self, scope, receive, send, app):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        t0, status = time.monotonic(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        path = scope["path"]
        try:
            if self.api_key is not None and path != "/health" and not self._authorized(scope):
                await _respond_error(HTTPError(401, "a valid API key is required (Authorization: "
                                               "Bearer KEY)", code="invalid_api_key",
                                               kind="authentication_error"), scope, receive, send_status)
            else:
                await app(scope, receive, send_status)
        finally:
            route = path if path in FIELDS or path in ("/v1/models", "/health", "/metrics") else "other"
            key = (route, status[0])
            self.requests[key] = self.requests.get(key, 0) + 1
            usage = scope.get("pyllama.usage") or {}
            log.info("%s %s %s %d %.1f ms prompt=%s completion=%s", (scope.get("client") or ("-",))[0],
                     scope["method"], path, status[0], 1e3 * (time.monotonic() - t0),
                     usage.get("prompt_tokens", "-"), usage.get("completion_tokens", "-"))

    def _authorized(self, scope):
        got = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(got, b"Bearer " + self.api_key.encode())

    # -- requests ------------------------------------------------------------------------------------
    async def _json(self, request):
        n = request.headers.get("content-length", "")
        if n.isdigit() and int(n) > self.max_body:
            raise HTTPError(413, f"the body is {n} bytes, the limit is {self.max_body}", code="request_too_large")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise HTTPError(415, f"expected a JSON body (Content-Type: application/json), found "
                                 f"{kind or 'no content type'!r}", code="unsupported_media_type")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body:
                raise HTTPError(413, f"the body exceeds the limit of {self.max_body} bytes",
                                code="request_too_large")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"expected a JSON object, found {type(body).__name__}", code="invalid_json")
        return body

    def _request(self, path, body):
        """Check the body's fields; the request's Completion, its shape and stream options."""
        fields = FIELDS[path]
        chat = path == "/v1/chat/completions"
        for name in body:
            if name not in fields:
                raise HTTPError(400, f"{name}: unknown parameter", name, "unknown_parameter")
        body = {k: v for k, v in body.items() if v is not None}  # null: the field's default
        need = "messages" if chat else "prompt"
        if need not in body:
            raise HTTPError(400, f"{need}: required", need, "missing_required_parameter")
        kw = {k: body[k] for k in SAMPLING if k in body}
        try:
            V.optional(V.text, body.get("model"), "model")
            V.optional(V.text, body.get("user"), "user")
            V.integer(body.get("n", 1), "n", lo=1, hi=1)
            stream = V.boolean(body.get("stream", False), "stream")
            opts = body.get("stream_options") or {}
            if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
                raise ParameterError(f"stream_options: expected {{'include_usage': bool}}, found {opts!r:.60}")
            usage = V.boolean(opts.get("include_usage", False), "stream_options")
            if chat:
                if "max_completion_tokens" in body:
                    kw["max_tokens"] = body["max_completion_tokens"]
                kw.setdefault("max_tokens", None)
                top = V.optional(V.integer, body.get("top_logprobs"), "top_logprobs", lo=0, hi=MAX_LOGPROBS)
                if V.boolean(body.get("logprobs", False), "logprobs"):
                    kw["logprobs"] = top or 0
                req = chat_request(self.llama, body["messages"], n_ctx=self.engine.n_ctx, **kw)
                shape = ChatShape(self.model_name, req)
            else:
                prompt = body["prompt"]
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if body.get("echo") and body.get("logprobs") is not None:
                    raise ParameterError("echo: with logprobs it is not served (use the Python API)")
                req = Completion(self.llama, prompt, logprobs=body.get("logprobs"),
                                 echo=body.get("echo", False), n_ctx=self.engine.n_ctx, **kw)
                shape = TextShape(self.model_name, req)
        except ParameterError as e:
            raise _bad_argument(e, fields, need) from None
        except PyllamaError as e:  # a chat template that fails on these messages
            raise HTTPError(400, str(e), need, "invalid_value") from None
        return req, shape, stream, usage

    def _submit(self, req):
        if req.max_tokens == 0:
            req.finish("length")
            return None
        try:
            return self.engine.submit_async(req.ids, req)
        except BusyError as e:
            raise HTTPError(503, str(e), code="server_busy", kind="server_error",
                            headers={"Retry-After": "1"}) from None

    def _done(self, scope, req, handle):
        """After the engine let go of the request: its last piece, the token counts."""
        if handle is not None:
            req.finish(handle.finish_reason)
        scope["pyllama.usage"] = req.usage
        self.tokens["prompt"] += req.usage["prompt_tokens"]
        self.tokens["generated"] += req.usage["completion_tokens"]
        return handle.error if handle is not None else None

    async def completion(self, request):
        from starlette.responses import JSONResponse, StreamingResponse
        req, shape, stream, usage = self._request(request.url.path, await self._json(request))
        handle = self._submit(req)
        if not stream:
            watch = asyncio.ensure_future(_cancel_on_disconnect(request, handle))
            try:
                if handle is not None:
                    async for _ in handle:
                        pass
            finally:
                watch.cancel()
            error = self._done(request.scope, req, handle)
            if error is not None:
                raise HTTPError(500, f"generation failed: {error}", kind="server_error")
            return JSONResponse(shape.whole(req.take()))

        async def events():
            try:
                for chunk in shape.start():
                    yield _sse(chunk)
                if handle is not None:
                    async for _ in handle:
                        for piece in req.take():
                            for chunk in shape.chunks(*piece):
                                yield _sse(chunk)
                error = self._done(request.scope, req, handle)
                for piece in req.take():
                    for chunk in shape.chunks(*piece):
                        yield _sse(chunk)
                if error is not None:
                    yield _sse(HTTPError(500, f"generation failed: {error}", kind="server_error").body())
                if usage:
                    yield _sse({"id": shape.id, "object": shape.chunks("", [], None)[0]["object"],
                                "created": shape.created, "model": shape.model, "choices": [],
                                "usage": req.usage})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): free the slot within one step
                if handle is not None and handle.finish_reason is None:
                    handle.cancel()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": int(self.started), "owned_by": "pyllama"}]})

    async def health(self, request):
        from starlette.responses import JSONResponse
        s = self.engine.stats()
        return JSONResponse({"status": "ok", "slots_idle": s["slots"] - s["slots_in_use"],
                             "slots_processing": s["slots_in_use"], "queue": s["waiting"]})

    async def metrics(self, request):
        from starlette.responses import PlainTextResponse
        return PlainTextResponse(self.prometheus(), media_type="text/plain; version=0.0.4")

    def prometheus(self):
        s = self.engine.stats()
        now = time.monotonic()
        self._rate.append((now, s["generated"]))
        while len(self._rate) > 2 and now - self._rate[1][0] >= 60:
            del self._rate[0]
        t0, g0 = self._rate[0]
        lines = ["# HELP pyllama_requests_total HTTP requests by route and status",
                 "# TYPE pyllama_requests_total counter"]
        lines += [f'pyllama_requests_total{{route="{r}",status="{c}"}} {n}'
                  for (r, c), n in sorted(self.requests.items())]
        for name, kind, value, help_ in (
                ("prompt_tokens_total", "counter", self.tokens["prompt"], "prompt tokens of finished requests"),
                ("completion_tokens_total", "counter", self.tokens["generated"], "completion tokens of finished requests"),
                ("generated_tokens_total", "counter", s["generated"], "tokens generated (cancelled requests' too)"),
                ("prompt_tokens_evaluated_total", "counter", s["prompt_tokens"], "prompt tokens the engine evaluated"),
                ("prompt_tokens_reused_total", "counter", s["reused_tokens"], "prompt tokens a slot's cache already held"),
                ("engine_steps_total", "counter", s["steps"], "batched forward passes"),
                ("queue_length", "gauge", s["waiting"], "requests waiting for a slot"),
                ("slots_in_use", "gauge", s["slots_in_use"], "slots running a request"),
                ("slots", "gauge", s["slots"], "slots (--parallel)"),
                ("tokens_per_second", "gauge", round((s["generated"] - g0) / (now - t0), 3) if now > t0 else 0.0,
                 "tokens generated per second since the oldest scrape of the last minute (or the start)")):
            lines += [f"# HELP pyllama_{name} {help_}", f"# TYPE pyllama_{name} {kind}", f"pyllama_{name} {value}"]
        return "\n".join(lines) + "\n"


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request, handle):
    if handle is None:
        return
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def _respond_error(err, scope, receive, send):
    from starlette.responses import JSONResponse
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)


class _Outer:
    """Around everything (errors included): the key check, the log line, the request counts."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        await self.server(scope, receive, send, self.app)


def build_app(model_or_path, **options):
    """The ASGI app serving model_or_path (a model file path or a pyllama.Llama, which is then
    shared, not closed by the app). options: parallel (slots, 4), ctx_size (per slot; default the
    model's context, at most 4096), threads, api_key, max_queue (64), tokenizer, chat_template,
    max_body (bytes, 1 MiB), model_name (the id /v1/models reports; default the file's name).
    The engine runs from here; the ASGI lifespan's end (or app.state.server.close()) stops it."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as e:
        raise PyllamaError(f"the server needs Starlette and uvicorn: pip install 'pyllama[server]' ({e})") from None
    unknown = set(options) - set(SERVE_OPTIONS)
    if unknown:
        raise ParameterError(f"build_app: unknown option(s) {', '.join(sorted(unknown))}")
    server = Server(model_or_path, **{**SERVE_OPTIONS, **options})

    async def on_error(request, exc):
        if isinstance(exc, HTTPException):
            exc = HTTPError(exc.status_code, exc.detail, code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.close)

    app = Starlette(routes=[Route("/v1/completions", server.completion, methods=["POST"]),
                            Route("/v1/chat/completions", server.completion, methods=["POST"]),
                            Route("/v1/models", server.models, methods=["GET"]),
                            Route("/health", server.health, methods=["GET"]),
                            Route("/metrics", server.metrics, methods=["GET"])],
                    middleware=[Middleware(_Outer, server=server)],
                    exception_handlers={HTTPError: on_error, HTTPException: on_error}, lifespan=lifespan)
    app.state.server, app.state.engine, app.state.llama = server, server.engine, server.llama
    return app


def serve(model, host="127.0.0.1", port=8080, **options):
    """Run the server until interrupted (`pyllama serve`)."""
    try:
        import uvicorn
    except ImportError as e:
        raise PyllamaError(f"the server needs Starlette and uvicorn: pip install 'pyllama[server]' ({e})") from None
    V.text(host, "--host")
    port = V.integer(port, "--port", lo=0, hi=65535)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = build_app(model, **options)
    e = app.state.engine
    log.info("serving %s on http://%s:%d (%d slots of %d positions, queue %d)", app.state.server.model_name,
             host, port, e.stats()["slots"], e.n_ctx, e.max_queue)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning",
                timeout_graceful_shutdown=30)
