"""The server's request side: a JSON body checked field by field and turned into the request's
Completions (pyllama.completion: the object Llama.create_completion drives) and their OpenAI
shapes. Errors are HTTPError in OpenAI's shape, 400s naming the field (pyllama/server.py sends
them).

Fields beyond the Python API's keywords: n (choices; choice i samples with
completion.choice_seed(seed, i) = seed + i, so each choice is the n=1 request with that seed),
stream, stream_options.include_usage, model and user (checked, not used); chat's logprobs: true
with top_logprobs: N is the API's logprobs=N, max_completion_tokens is max_tokens. Extensions
(as llama.cpp's server has them): the sampler's top_k, min_p, typical_p, repeat_penalty,
repeat_last_n, stop_token_ids, and context_shift with n_keep (a generation that fills the
context drops the oldest positions after the first n_keep instead of ending, as the API does).
"""
import json
import re

from . import validate as V
from .chat import ChatShape, chat_request
from .completion import MAX_LOGPROBS, Completion, TextShape, choice_seed
from .errors import ParameterError, PyllamaError

MAX_CHOICES = 16
SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty",
            "repeat_last_n", "frequency_penalty", "presence_penalty", "logit_bias", "stop",
            "stop_token_ids", "seed", "context_shift", "n_keep"}
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


class Request:
    """A checked request: its choices (a Completion and its shape each), stream, include_usage."""

    def __init__(self, reqs, shapes, stream, usage):
        self.reqs, self.shapes, self.stream, self.include_usage = reqs, shapes, stream, usage

    @property
    def usage(self):
        """OpenAI's: the prompt once, the completion tokens of all choices."""
        n_in = self.reqs[0].usage["prompt_tokens"]
        n_out = sum(r.usage["completion_tokens"] for r in self.reqs)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def whole(self):
        """The response of a request without stream, once every choice has finished."""
        out = None
        for shape, req in zip(self.shapes, self.reqs):
            one = shape.whole(req.take())
            if out is None:
                out = one
            else:
                out["choices"] += one["choices"]
        out["usage"] = self.usage
        return out

    def usage_chunk(self):
        s = self.shapes[0]
        return {"id": s.id, "object": s.chunks("", [], None)[0]["object"], "created": s.created,
                "model": s.model, "choices": [], "usage": self.usage}


async def read_json(request, max_body):
    """The body of a starlette Request as a dict: 413 past max_body bytes, 415 without a JSON
    content type, 400 for malformed JSON or a non-object."""
    n = request.headers.get("content-length", "")
    if n.isdigit() and int(n) > max_body:
        raise HTTPError(413, f"the body is {n} bytes, the limit is {max_body}", code="request_too_large")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HTTPError(415, f"expected a JSON body (Content-Type: application/json), found "
                             f"{kind or 'no content type'!r}", code="unsupported_media_type")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > max_body:
            raise HTTPError(413, f"the body exceeds the limit of {max_body} bytes", code="request_too_large")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise HTTPError(400, f"expected a JSON object, found {type(body).__name__}", code="invalid_json")
    return body


def parse(llama, model_name, n_ctx, path, body):
    """Check the body's fields (path: the route); the Request."""
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
        n = V.integer(body.get("n", 1), "n", lo=1, hi=MAX_CHOICES)
        stream = V.boolean(body.get("stream", False), "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise ParameterError(f"stream_options: expected {{'include_usage': bool}}, found {opts!r:.60}")
        usage = V.boolean(opts.get("include_usage", False), "stream_options")
        seed = kw.pop("seed", None)
        if chat:
            if "max_completion_tokens" in body:
                kw["max_tokens"] = body["max_completion_tokens"]
            kw.setdefault("max_tokens", None)
            top = V.optional(V.integer, body.get("top_logprobs"), "top_logprobs", lo=0, hi=MAX_LOGPROBS)
            if V.boolean(body.get("logprobs", False), "logprobs"):
                kw["logprobs"] = top or 0
            reqs = [chat_request(llama, body["messages"], n_ctx=n_ctx, seed=choice_seed(seed, i), **kw)
                    for i in range(n)]
            Shape = ChatShape
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            reqs = [Completion(llama, prompt, logprobs=body.get("logprobs"), echo=body.get("echo", False),
                               n_ctx=n_ctx, seed=choice_seed(seed, i), **kw) for i in range(n)]
            Shape = TextShape
    except ParameterError as e:
        raise _bad_argument(e, fields, need) from None
    except PyllamaError as e:  # a chat template that fails on these messages
        raise HTTPError(400, str(e), need, "invalid_value") from None
    shapes = [Shape(model_name, reqs[0])]
    shapes += [Shape(model_name, r, i, shapes[0]) for i, r in enumerate(reqs[1:], 1)]
    return Request(reqs, shapes, stream, usage)


def _bad_argument(e, fields, prompt_field):
    """A ParameterError as a 400 naming the field its message starts with."""
    msg = str(e)
    m = re.match(r"([a-z_]+)", msg)
    if msg.startswith("the prompt") and "context" in msg:
        return HTTPError(400, msg.split(" (lower")[0] + " (lower max_tokens, shorten the prompt, or "
                         "send context_shift: true)", prompt_field, "context_length_exceeded")
    if msg.startswith("the prompt"):
        return HTTPError(400, msg, prompt_field, "invalid_value")
    return HTTPError(400, msg, m.group(1) if m and m.group(1) in fields else None, "invalid_value")
