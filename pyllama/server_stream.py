"""Streamed answers of pyllama/server.py: server-sent events as the engine delivers tokens.

Per token, the engine thread wakes the event loop once per step for all streams (not once per
token: pyllama.engine posts a step's news together), a stream writes everything that is ready at
a wake-up in one chunk, and a piece of text is framed into its event by splicing its JSON string
into the chunk's pre-rendered bytes (the same bytes json.dumps of the chunk gives).
"""
import asyncio
import json

from .server_request import HTTPError


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class EventStream:
    """The ASGI response of a streamed request: `data: {chunk}` events as the engine delivers
    the choices' tokens (all news of one wake-up in one write), then `data: [DONE]`. A client
    that goes away cancels the choices (their slots are free within one engine step)."""
    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]

    def __init__(self, r, handles, done):
        self.r, self.handles, self.done = r, handles, done  # done(req, handle) -> its error
        self.plain = [_plain_chunk(shape) for shape in r.shapes]

    def _events(self, i, error):
        """The bytes of choice i's pieces ready now (and of its error)."""
        out = []
        for text, records, finish in self.r.reqs[i].take():
            if not records and finish is None and self.plain[i] is not None:
                head, tail = self.plain[i]  # (the common piece, without json.dumps of a dict)
                out.append(b"data: " + head + json.dumps(text, ensure_ascii=False).encode() + tail)
            else:
                out += [_sse(chunk) for chunk in self.r.shapes[i].chunks(text, records, finish)]
        if error is not None:
            out.append(_sse(HTTPError(500, f"generation failed: {error}", kind="server_error").body()))
        return out

    async def __call__(self, scope, receive, send):
        r, handles = self.r, self.handles
        watch = asyncio.ensure_future(cancel_on_disconnect(receive, handles))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            out = [_sse(chunk) for shape in r.shapes for chunk in shape.start()]
            async for news in updates(handles):
                for i, end in news:
                    out += self._events(i, self.done(r.reqs[i], handles[i]) if end else None)
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                    out = []
            scope["pyllama.usage"] = r.usage
            if r.include_usage:
                out.append(_sse(r.usage_chunk()))
            out.append(b"data: [DONE]\n\n")
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})
        finally:  # the client went away (or we are done): free the slots within one step
            watch.cancel()
            cancel(handles)


def _plain_chunk(shape):
    """A shape's stream chunk of a piece of text alone (no logprobs, not the last) as the bytes
    before and after the text's JSON string (None if the shape's chunk is not one such object)."""
    marker = "\x00pyllama-text\x00"
    chunks = shape.chunks(marker, [], None)
    if len(chunks) != 1:
        return None
    parts = json.dumps(chunks[0], ensure_ascii=False).split(json.dumps(marker))
    return (parts[0].encode(), parts[1].encode() + b"\n\n") if len(parts) == 2 else None


async def cancel_on_disconnect(receive, handles):
    while (await receive())["type"] != "http.disconnect":
        pass
    cancel(handles)


def cancel(handles):
    for h in handles:
        if h is not None and h.finish_reason is None:
            h.cancel()


async def updates(handles):
    """Lists of (i, ended) as the choices' handles deliver: (i, False) when choice i has new
    tokens, (i, True) once it has ended (None: a choice that ended before it started); each
    list holds the news of one wake-up."""
    if len(handles) == 1:  # (the common case: no task in between)
        if handles[0] is None:
            yield [(0, True)]
            return
        while True:
            tokens, ended = await handles[0].updates()
            yield [(0, ended)]
            if ended:
                return
    q = asyncio.Queue()

    async def pump(i, h):
        try:
            while h is not None:
                tokens, ended = await h.updates()
                if ended:
                    break
                q.put_nowait((i, False))
        finally:
            q.put_nowait((i, True))
    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            news = [await q.get()]
            while not q.empty():
                news.append(q.get_nowait())
            left -= sum(end for _, end in news)
            yield news
    finally:
        for t in tasks:
            t.cancel()
