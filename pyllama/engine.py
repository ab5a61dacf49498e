"""Continuous batching: many requests share one Transformer's KV slots and each forward pass.

    engine = Engine(llama, slots=4)            # a background thread owns the model from here
    h = engine.submit(prompt_ids, GreedyPolicy(max_tokens=64))
    for token in h: ...                        # or: async for token in h (submit(..., loop=loop))
    h.finish_reason                            # "stop", "length", "cancelled" or "error"
    engine.close()

Each step gathers the next token of every decoding request plus chunks of waiting prompts (at most
step_tokens tokens in all, so running streams keep flowing while a long prompt comes in), runs
them as one batch (pl_forward_batch: every weight row read once for all of them) and hands each
request its logits. Per-request logic lives in a policy object with two methods, called in the
engine thread:
    choose(logits) -> token      logits: this request's float32 row (scratch: may be overwritten)
    accept(token) -> reason|None a finish reason ("stop", "length", ...) ends the request
and two optional ones:
    prompt_row(i, logits)        with the attribute prompt_rows true: the row after each prompt
                                 token i but the last, in order (echo with logprobs); such a
                                 request evaluates its whole prompt (no cached prefix)
    make_room(pos) -> (n_keep, n_discard) or None   when the slot's context is full: the context
                                 shift to apply (kvcache.shift on the slot); None ends it "length"
GreedyPolicy below is the plug-in default (pyllama's llama2.c sampler, a token limit, stop ids);
pyllama.completion.Completion (sampler chain, stop strings, detokenizer, logprobs) is the policy
the server uses: the same object Llama.create_completion drives. accept() runs before the token
is delivered, so a client woken by it finds the policy's output for that token.

A slot keeps its cache after its request ends: a new request whose prompt shares a prefix with
what a free slot holds reuses it and evaluates only the rest.

threads is the most a step uses: with adapt_threads (the default) each step runs on as many of
them as steps of its size ran fastest on lately (pyllama/threadtune.py: under contention from
the server's own event loop and clients, a small step is often faster on fewer threads).
"""
import asyncio
import collections
import queue
import threading
import time

from . import kvcache, validate
from ._core import ffi
from .errors import BusyError, ParameterError, PyllamaError
from .model import Transformer
from .sampler import Sampler
from .threadtune import ThreadTuner

_DONE = object()  # end of a handle's event stream


class GreedyPolicy:
    """The default policy: llama2.c's sampler (temperature 0: argmax), at most max_tokens tokens,
    finishing ("stop") on any of stop_ids."""

    def __init__(self, max_tokens=16, stop_ids=(), temperature=0.0, topp=0.9, seed=None):
        self.max_tokens = validate.integer(max_tokens, "max_tokens", 1)
        self.stop_ids = frozenset(stop_ids)
        self._args = (temperature, topp, seed)
        self._sampler = None
        self.n = 0

    def choose(self, logits):
        if self._sampler is None:
            self._sampler = Sampler(len(logits), *self._args)
        return self._sampler.sample(ffi.from_buffer("float[]", logits))

    def accept(self, token):
        self.n += 1
        if token in self.stop_ids:
            return "stop"
        return "length" if self.n >= self.max_tokens else None


class Handle:
    """One request: iterate it (or `async for`, when submitted with a loop) for its token ids;
    finish_reason is set once it ends. cancel() ends it within one engine step."""

    def __init__(self, engine, prompt, policy, loop):
        self.prompt = prompt
        self.policy = policy
        self.tokens = []           # generated ids (engine thread appends before delivering)
        self.finish_reason = None
        self.error = None
        self._engine = engine
        self._loop = loop
        self._events = asyncio.Queue() if loop is not None else queue.Queue()
        self._cancelled = False
        self._fed = 0              # prompt tokens in the slot's cache (engine thread)
        self._next = None          # the sampled token to feed next step (engine thread)

    def cancel(self):
        self._cancelled = True
        self._engine._wake()

    def _deliver(self, event):  # engine thread
        if self._loop is None:
            self._events.put(event)
        elif self._engine._outbox is not None:  # in a step: one wake-up per loop at its end
            self._engine._outbox.append((self, event))
        else:
            _post(self._loop, [(self, event)])

    def __iter__(self):
        if self._loop is not None:
            raise PyllamaError("this request was submitted with an event loop: use `async for`")
        while True:
            event = self._events.get()
            if event is _DONE:
                return
            yield event

    async def __aiter__(self):
        while True:
            tokens, ended = await self.updates()
            for token in tokens:
                yield token
            if ended:
                return

    async def updates(self):
        """(tokens, ended) once there is news: every token delivered since the last call (a
        client that fell behind gets them all at once); ended is True once the request is over
        (finish_reason is set), after which there is nothing more to await."""
        if self._loop is None:
            raise PyllamaError("this request was submitted without an event loop: iterate it")
        got = [await self._events.get()]
        while not self._events.empty():
            got.append(self._events.get_nowait())
        ended = got[-1] is _DONE
        return (got[:-1] if ended else got), ended

    def result(self, timeout=None):
        """Block until the request ends; its generated ids (the policy's error, if it failed).
        timeout (seconds): TimeoutError when it has not ended by then."""
        if self._loop is not None:
            raise PyllamaError("this request was submitted with an event loop: use `async for`")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.finish_reason is None:  # set before the end event is queued
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if self._events.get(timeout=left) is _DONE:
                    break
            except queue.Empty:
                raise TimeoutError(f"the request did not finish within {timeout} s") from None
        if self.error is not None:
            raise self.error
        return list(self.tokens)


class _Slot:
    def __init__(self, index):
        self.index = index
        self.held = []     # token ids whose keys/values the slot's cache holds (-1: after a
        #                    context shift, positions whose values saw dropped tokens: not reusable)
        self.req = None    # the active request's handle


class Engine:
    """Slots and a continuous-batching scheduler over one Transformer (see the module doc).

    model        a Llama (its model file is shared, not copied), a ModelFile or a path
    slots        sequences evaluated together (each has its own KV cache of n_ctx positions)
    max_queue    requests that may wait for a slot; beyond that submit() raises BusyError
    step_tokens  tokens per step (decoding tokens first, then prompt chunks)
    start        False: no background thread; call step() yourself (tests, embedding)
    adapt_threads  each step on the fastest number of threads up to threads (module doc)
    """

    def __init__(self, model, slots=4, n_ctx=None, threads=None, max_queue=64, step_tokens=None,
                 start=True, adapt_threads=True):
        from .formats import ModelFile, load
        mf = model if isinstance(model, ModelFile) else getattr(model, "file", None)
        if mf is None:
            mf = load(model)
        if not mf.has_weights or not mf.tensors:
            raise ParameterError(f"model: {mf.path} holds no weights to run (vocab-only or closed)")
        if n_ctx is None and hasattr(model, "n_ctx"):
            n_ctx = model.n_ctx
        self.model = Transformer(mf, n_ctx=n_ctx, threads=threads, n_slots=slots,
                                 repack=getattr(model, "repack", True))
        self.n_ctx = self.model.n_ctx
        nb = self.model.max_batch
        if self.model.n_slots > nb:
            raise ParameterError(f"slots: expected at most {nb} (the batch one step can hold at a "
                                 f"context of {self.n_ctx}), found {self.model.n_slots}")
        self.max_queue = validate.integer(max_queue, "max_queue", 0)
        self.step_tokens = validate.integer(nb if step_tokens is None else step_tokens,
                                            "step_tokens", self.model.n_slots, nb)
        self.max_threads = self.model.threads
        self._tuner = ThreadTuner(self.max_threads) if validate.boolean(
            adapt_threads, "adapt_threads") and self.max_threads > 1 else None
        self._slots = [_Slot(i) for i in range(self.model.n_slots)]
        self._waiting = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.counters = dict(steps=0, prompt_tokens=0, reused_tokens=0, generated=0, shifts=0)
        self._outbox = None  # during a step: (handle, event) for loops, posted at its end
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._run, name="pyllama-engine", daemon=True)
            self._thread.start()

    # -- client side (any thread) ----------------------------------------------------------------
    def submit(self, prompt, policy=None, loop=None):
        """Queue a request: prompt ids (at least one, fewer than n_ctx) and its policy (default
        GreedyPolicy()). loop: an asyncio loop to deliver to (then `async for` the handle).
        Raises BusyError when max_queue requests already wait."""
        prompt = validate.token_ids(prompt, self.model.vocab_size, "prompt", allow_empty=False)
        policy = GreedyPolicy() if policy is None else policy
        if not (callable(getattr(policy, "choose", None)) and callable(getattr(policy, "accept", None))):
            raise ParameterError(f"policy: expected an object with choose(logits) and accept(token), "
                                 f"found {policy!r}")
        if len(prompt) > self.n_ctx or len(prompt) == self.n_ctx and _room(policy, self.n_ctx) is None:
            raise ParameterError(f"the prompt is {len(prompt)} tokens; the context of "
                                 f"{self.n_ctx} positions leaves no room to generate")
        handle = Handle(self, prompt, policy, loop)
        with self._cv:
            if self._closed:
                raise PyllamaError("the engine is closed")
            if len(self._waiting) >= self.max_queue + self._free_slots():
                raise BusyError(f"all {len(self._slots)} slots are busy and {len(self._waiting)} "
                                f"requests wait (max_queue {self.max_queue}): retry later")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def submit_async(self, prompt, policy=None):
        """submit() from a coroutine: the handle delivers to the running loop (`async for`)."""
        return self.submit(prompt, policy, loop=asyncio.get_running_loop())

    def stats(self):
        """Slots in use, queue length and the counters (for a server's /metrics)."""
        with self._cv:
            return dict(self.counters, slots=len(self._slots), waiting=len(self._waiting),
                        slots_in_use=sum(s.req is not None for s in self._slots),
                        threads=self.model.threads)

    def close(self):
        """Stop the engine thread; requests still running or waiting end as "cancelled"."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cv:
            for h in list(self._waiting):
                self._finish(h, "cancelled")
            self._waiting.clear()
            for s in self._slots:
                if s.req is not None:
                    self._finish(s.req, "cancelled")
                    s.req = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _wake(self):
        with self._cv:
            self._cv.notify()

    def _free_slots(self):
        return sum(s.req is None for s in self._slots)

    # -- engine side (one thread) ----------------------------------------------------------------
    def _run(self):
        while True:
            with self._cv:
                while not self._closed and not self._waiting and all(s.req is None for s in self._slots):
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # pragma: no cover - the checks before C should prevent it
                with self._cv:
                    for s in self._slots:
                        if s.req is not None:
                            self._finish(s.req, "error", e)
                            s.req = None

    def _finish(self, h, reason, error=None):
        h.finish_reason, h.error = reason, error
        h._deliver(_DONE)

    def _admit(self):
        """Drop cancelled requests; move waiting ones into free slots, each into the free slot
        whose held tokens share the longest prefix with its prompt (reusing that much cache)."""
        with self._cv:
            for s in self._slots:
                if s.req is not None and s.req._cancelled:
                    self._finish(s.req, "cancelled")
                    s.req = None
            for h in [h for h in self._waiting if h._cancelled]:
                self._waiting.remove(h)
                self._finish(h, "cancelled")
            while self._waiting and self._free_slots():
                h = self._waiting.popleft()
                best, best_n = None, -1
                limit = 0 if getattr(h.policy, "prompt_rows", False) else len(h.prompt) - 1
                for s in self._slots:
                    if s.req is None:
                        n = _common_prefix(s.held, h.prompt, limit)
                        if n > best_n:
                            best, best_n = s, n
                self.model.truncate(best.index, best_n)
                del best.held[best_n:]
                best.req, h._fed, h._next = h, best_n, None
                self.counters["reused_tokens"] += best_n

    def step(self):
        """One scheduler step: admit, run one batch, hand out logits; False when idle. The
        engine thread calls it; call it yourself only on an engine made with start=False."""
        self._outbox = []
        try:
            return self._step()
        finally:
            out, self._outbox = self._outbox, None
            loops = {}
            for h, event in out:
                loops.setdefault(h._loop, []).append((h, event))
            for loop, items in loops.items():
                _post(loop, items)

    def _step(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        self._admit()
        active = [s for s in self._slots if s.req is not None]
        if not active:
            return False
        tokens, slots, want, owners = [], [], [], []
        for s in active:  # decoding requests: their last sampled token
            if s.req._next is not None:
                tokens.append(s.req._next), slots.append(s.index), want.append(True), owners.append((s, None))
        budget = self.step_tokens - len(tokens)
        for s in active:  # prompts, oldest slot first, in chunks within the step budget
            h = s.req
            if h._next is None and budget > 0:
                start, chunk = h._fed, h.prompt[h._fed:h._fed + budget]
                h._fed += len(chunk)
                budget -= len(chunk)
                self.counters["prompt_tokens"] += len(chunk)
                tokens += chunk
                slots += [s.index] * len(chunk)
                every = getattr(h.policy, "prompt_rows", False)
                for i in range(start, h._fed):
                    last = i == len(h.prompt) - 1
                    want.append(last or every)
                    owners.append((s, None if last else i))
        if self._tuner is not None:
            key, self.model.threads = self._tuner.pick(len(tokens))
        logits = self.model.forward_batch(tokens, slots, want)
        for tok, s in zip(tokens, slots):
            self._slots[s].held.append(tok)
        self.counters["steps"] += 1
        row = 0
        for owner, w in zip(owners, want):
            if w:
                s, i = owner
                if i is None:
                    self._hand_out(s, logits[row])
                else:
                    self._prompt_row(s, i, logits[row])
                row += 1
        if self._tuner is not None:
            self._tuner.done(key, time.perf_counter() - t0, time.thread_time() - c0)
        return True

    def _prompt_row(self, s, i, logits):
        h = s.req
        if h is None or h._cancelled:
            return
        try:
            h.policy.prompt_row(i, logits)
        except Exception as e:  # a broken policy ends its own request, not the engine
            with self._cv:  # (its later rows this step find the slot empty)
                s.req = None
                self._finish(h, "error", e)

    def _hand_out(self, s, logits):
        h = s.req
        if h is None or h._cancelled:
            return  # _admit finishes it at the start of the next step
        try:
            token = h.policy.choose(logits)
            token = validate.integer(token, "the policy's token", 0, self.model.vocab_size - 1)
            h.tokens.append(token)
            reason = h.policy.accept(token)  # before delivery: what the policy made of the token
        except Exception as e:  # a broken policy ends its own request, not the engine
            reason, error = "error", e
        else:
            error = None
            h._deliver(token)  # (text, for a Completion) is ready when the client hears of it
            if not reason and len(s.held) >= self.n_ctx:  # no position for the next token
                reason, error = self._make_room(s, h.policy)
        self.counters["generated"] += 1
        if reason:
            with self._cv:
                s.req = None
                self._finish(h, reason, error)
        else:
            h._next = token


    def _make_room(self, s, policy):
        """The slot is full: shift its context as the policy says; (finish reason, error)."""
        try:
            room = _room(policy, len(s.held))
            if room is None:
                return "length", None
            keep, drop = room
            kvcache.shift(self.model, keep, drop, slot=s.index)
        except Exception as e:  # a bad shift from a policy: its request ends with the error
            return "error", e
        s.held[keep:] = [-1] * (len(s.held) - keep - drop)
        self.counters["shifts"] += 1
        return None, None


def _post(loop, items):
    """Hand (handle, event) pairs to their loop's thread in one wake-up (engine thread)."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the client's loop is closed: nobody listens any more
        for h, _ in items:
            h._cancelled = True


def _put_all(items):  # in the loop's thread
    for h, event in items:
        h._events.put_nowait(event)


def _room(policy, pos):
    make_room = getattr(policy, "make_room", None)
    return make_room(pos) if make_room is not None else None


def _common_prefix(a, b, limit):
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n
