"""`pyllama serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    app = build_app("model.gguf", parallel=4, ctx_size=2048, api_key=None, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=8080)          # what `pyllama serve` does

build_app(model_or_path, **options) -> ASGI app is the stable entry point (pyllama.ray wraps it
in Ray Serve); its keywords are SERVE_OPTIONS below. The app owns an Engine (app.state.engine,
closed when the ASGI lifespan ends) and a Llama for text (app.state.llama): every choice of a
request is a pyllama.completion.Completion, the object Llama.create_completion drives, here
driven by the engine as the request's policy, so a request gives the same text from Python and
over HTTP (echo with logprobs, context shift included). The body's fields are checked, and the
Completions made, in pyllama/server_request.py; n choices run as n engine requests at once;
streamed answers are written by pyllama/server_stream.py.

Why Starlette + uvicorn: Starlette is small (one dependency, anyio), well kept, and has what an
OpenAI-style API needs (routing, JSON, lifespan, any ASGI callable as a response); FastAPI would
add pydantic models whose validation would be a second copy of pyllama/validate.py. uvicorn is
the reference ASGI server. Both are the optional extra `pyllama[server]`.

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
import logging
import time

from . import validate as V
from .errors import BusyError, ParameterError, PyllamaError
from .server_request import FIELDS, HTTPError, parse, read_json
from .server_stream import EventStream, cancel, cancel_on_disconnect, updates

log = logging.getLogger("pyllama.server")

SERVE_OPTIONS = dict(parallel=4, ctx_size=None, threads=None, api_key=None, max_queue=64,
                     tokenizer=None, chat_template=None, max_body=1 << 20, model_name=None,
                     repack=True)


class Server:
    """The app's state: the model, the engine, the counters; the route handlers."""

    def __init__(self, model, parallel, ctx_size, threads, api_key, max_queue, tokenizer,
                 chat_template, max_body, model_name, repack):
        from .engine import Engine
        from .formats import load
        from .llama import Llama
        from .model import context_size
        self.api_key = V.optional(V.text, api_key, "api_key")
        self.max_body = V.integer(max_body, "max_body", lo=1)
        repack = V.boolean(repack, "repack")  # (for a path; a Llama given here keeps its own)
        self.own_llama = not isinstance(model, Llama)
        if self.own_llama:
            mf = load(model)
            ctx_size = context_size(ctx_size, mf.config["seq_len"], "ctx_size")
            # text only (tokenizer, templates): the engine runs the model, so a 1-position cache here
            self.llama = Llama(mf, tokenizer=tokenizer, threads=threads, n_ctx=1, chat_template=chat_template,
                               repack=repack)
        else:
            self.llama = model
            if ctx_size is not None:
                ctx_size = context_size(ctx_size, model.config["seq_len"], "ctx_size")
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
    def _submit(self, reqs):
        """The engine's handles of a request's choices (None for one with max_tokens 0 and no
        prompt logprobs to compute); 503 when the queue cannot take them all."""
        handles = []
        try:
            for req in reqs:
                if req.max_tokens == 0 and not req.prompt_rows:
                    req.finish("length")
                    handles.append(None)
                else:
                    handles.append(self.engine.submit_async(req.ids, req))
        except BusyError as e:
            for h in handles:
                if h is not None:
                    h.cancel()
            raise HTTPError(503, str(e), code="server_busy", kind="server_error",
                            headers={"Retry-After": "1"}) from None
        return handles

    def _done(self, req, handle):
        """After the engine let go of a choice: its last piece, the token counts; its error."""
        if handle is not None:
            req.finish(handle.finish_reason)
        self.tokens["prompt"] += req.usage["prompt_tokens"]
        self.tokens["generated"] += req.usage["completion_tokens"]
        return handle.error if handle is not None else None

    async def completion(self, request):
        from starlette.responses import JSONResponse
        r = parse(self.llama, self.model_name, self.engine.n_ctx, request.url.path,
                  await read_json(request, self.max_body))
        handles = self._submit(r.reqs)
        if r.stream:
            return EventStream(r, handles, self._done)
        errors = []
        watch = asyncio.ensure_future(cancel_on_disconnect(request.receive, handles))
        try:
            async for news in updates(handles):
                errors += [self._done(r.reqs[i], handles[i]) for i, end in news if end]
        finally:
            watch.cancel()
            cancel(handles)
        request.scope["pyllama.usage"] = r.usage
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise HTTPError(500, f"generation failed: {error}", kind="server_error")
        return JSONResponse(r.whole())

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
                ("context_shifts_total", "counter", s["shifts"], "context shifts of full slots (context_shift)"),
                ("queue_length", "gauge", s["waiting"], "requests waiting for a slot"),
                ("slots_in_use", "gauge", s["slots_in_use"], "slots running a request"),
                ("slots", "gauge", s["slots"], "slots (--parallel)"),
                ("threads", "gauge", s["threads"], "threads the last engine step ran on (at most --threads)"),
                ("tokens_per_second", "gauge", round((s["generated"] - g0) / (now - t0), 3) if now > t0 else 0.0,
                 "tokens generated per second since the oldest scrape of the last minute (or the start)")):
            lines += [f"# HELP pyllama_{name} {help_}", f"# TYPE pyllama_{name} {kind}", f"pyllama_{name} {value}"]
        return "\n".join(lines) + "\n"


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
    model's context, at most 4096; 0 all of it), threads, api_key, max_queue (64), tokenizer, chat_template,
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
