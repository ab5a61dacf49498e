"""Binds a ModelFile's numpy views into the C structs and runs the forward pass.

Every cdata made here (from_buffer pointers, structs, arrays) is kept on the Transformer so the
memory C points into stays alive as long as the Transformer does. Weight matrices are bound
where the file has them, or, with repack (the default), to a copy made once at load in the layout
this build's kernels read fastest (Transformer._matrix; repack=False: never copied).
"""
import mmap
import os
import threading
import time
import weakref

import numpy as np

from . import arch as archs
from . import validate
from ._core import ffi, lib
from .errors import ParameterError, PyllamaError
from .formats.common import BF16, F16, F32, MAX_SEQ, Q8_G
from .threadtune import ThreadTuner

MAX_THREADS = 1024
MAX_SLOTS = 256           # sequences one Transformer's KV cache may hold
MAX_BATCH = 128            # prompt tokens per forward call (each weight row is read once per batch)
ATT_BYTES = 64 << 20      # cap on a batch's attention scores
ARENA_BYTES = 64 << 20    # least allocation for repacked copies (Transformer._repack_buffer)
DEFAULT_CTX = 4096        # positions of a KV cache when none are asked for (llama.cpp's default -c)
FLOAT_TYPES = (F32, F16, BF16)

# GNU OpenMP's thread pool does not survive fork(): a child that opens a parallel region after its
# parent used one hangs. So in a forked child every model runs single-threaded (the serial path
# never touches the pool). Use multiprocessing's "spawn"/"forkserver" for multi-threaded children.
_live = weakref.WeakSet()
_forked = False


def _after_fork_in_child():
    global _forked
    _forked = True
    for t in list(_live):
        t._state.n_threads = t._max_threads = 1
        t._tuner = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# A team of threads meets at 6 (float weights) to 10 (quantized) barriers per layer; below this
# many multiply-adds per token and layer (the matmuls' weights), a second thread saves less time
# than those meetings cost and one thread is the default. Measured by benchmarks/threads.py
# (2-core AMD EPYC shared with other jobs; 2 threads / 1 thread): 45,312 (stories260K) 0.07x,
# 110,592 0.22x, 197,632 0.24x, 442,368 0.95x, 995,328 (stories15M) 1.98x; alone, stories260K
# gains nothing from 2 threads either (README, "Speed"). The threshold sits between the last
# shape that lost and the first that broke even.
MIN_LAYER_WORK = 300_000


def layer_work(config):
    """Multiply-adds of one token's matmuls in one layer: q, k, v, o and the three FFN matrices."""
    dim, hidden = config["dim"], config["hidden_dim"]
    head_dim = config.get("head_dim") or dim // config["n_heads"]
    q_dim, kv_dim = head_dim * config["n_heads"], head_dim * config["n_kv_heads"]
    return 2 * dim * (q_dim + kv_dim) + 3 * dim * hidden


def default_threads(config=None):
    """All cores available to this process, or 1 for a model too small to gain from more."""
    if config is not None and layer_work(config) < MIN_LAYER_WORK:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_threads(threads):
    if threads is None:
        return default_threads()
    return validate.integer(threads, "threads", lo=1, hi=MAX_THREADS)


def available_memory():
    """Bytes of memory available now (Linux: MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def repack_budget():
    """Bytes of repacked weight copies a model may make at load (Transformer._matrix): half the
    memory available now, or None (no limit) when that is unknown."""
    avail = available_memory()
    return None if avail is None else avail // 2


HUGE = 2 << 20


def context_size(n_ctx, seq_len, name="n_ctx"):
    """The positions a KV cache gets when `n_ctx` are asked for (Llama's n_ctx, the server's
    ctx_size, Ray's n_ctx): None, the model's context (seq_len) up to DEFAULT_CTX; 0, all of the
    model's context (as llama-cpp-python's n_ctx=0 and llama.cpp's -c 0); else n_ctx itself, past
    seq_len too (as llama.cpp's -c: RoPE extends, quality may not). Models trained for 128K
    positions ask for an 8.6 to 34 GB float32 cache (Llama 3.x 1B to 8B) that most uses never
    fill, and which the load would map in full."""
    if n_ctx is None:
        return min(seq_len, DEFAULT_CTX)
    n_ctx = validate.integer(n_ctx, f"{name} (context positions, 0 = the model's {seq_len})",
                             lo=0, hi=MAX_SEQ)
    return n_ctx or seq_len


def kv_position_bytes(config):
    """Bytes of one position of a slot's KV cache: float32 keys and values of every layer."""
    return 2 * 4 * config["n_layers"] * config["n_kv_heads"] * config["head_dim"]


def aligned_buffer(n):
    """n writable bytes for a repacked copy, 64-byte aligned; from 2 MiB up, an anonymous mapping
    on 2 MiB boundaries advised into transparent huge pages where the kernel offers them (read
    once per token front to back: 4 KiB pages cost a TLB miss and a stop of the hardware
    prefetcher every 4 KiB). Freed when the array is."""
    if n < HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        buf = np.empty(n + 64, np.uint8)
        off = -buf.ctypes.data % 64
        return buf[off:off + n]
    m = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(m, np.uint8)
    off = -buf.ctypes.data % HUGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, off, n)
    except OSError:  # a kernel without THP: small pages
        pass
    return buf[off:off + n]


def touch_pages(arr):
    """Writes a zero into every page of a fresh zeroed array, so the kernel maps its memory now
    rather than in the first forward pass. Measured on stories110M F32 (n_ctx 512, 2 threads): the
    first 128-token prompt after a load ran at 680-720 tok/s while its first writes faulted in
    37 MB of KV cache and buffers (2 MiB pages, cleared one by one), 1,020-1,050 with the pages
    touched here (about 10 ms of the load; 1B shape, n_ctx 512: 0.1 s); the later prompts ran at
    1,020-1,050 either way. llama.cpp likewise clears its KV cache when it makes it."""
    flat = arr.reshape(-1).view(np.uint8)
    flat[::mmap.PAGESIZE] = 0
    flat[-1:] = 0  # the last page, which the stride steps over where arr starts inside a page


def release_file_pages(mf, view):
    """Drops the file's pages under `view` (a tensor just repacked: its kernels read the copy) from
    this process's resident set, so the file and its copy are not both counted; a later read
    (the embedding rows of a tied classifier) faults them back in from the page cache."""
    mm = getattr(mf.mmap, "_mmap", None)
    if mm is None or getattr(mf.mmap, "offset", 1) != 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = view.ctypes.data - mf.mmap.ctypes.data
    if start < 0 or start + view.nbytes > mf.mmap.nbytes:
        return
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class ModelLock:
    """A Transformer's KV cache belongs to one generation at a time. Other threads wait for it;
    the thread that holds it (e.g. a second generate() started while a first one is still being
    iterated) gets a clear error instead of a deadlock or a corrupted cache."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None

    def __enter__(self):
        me = threading.get_ident()
        if self._owner == me:
            raise PyllamaError("this model is already in use by an unfinished generation in this "
                               "thread: finish or close() that generator first")
        self._lock.acquire()
        self._owner = me
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()


class Transformer:
    """The C forward pass over one ModelFile, with its own KV cache of n_slots sequences (slots)
    of n_ctx positions each. forward() and prefill() run slot 0; forward_batch() runs tokens of
    any slots together. slot_len[i] is the number of positions slot i holds."""

    def __init__(self, model_file, n_ctx=None, threads=None, n_slots=1, repack=True):
        cfg = model_file.config
        self.file = model_file
        self.config = cfg
        self.vocab_size = cfg["vocab_size"]
        self.n_ctx = context_size(n_ctx, cfg["seq_len"])
        self.n_slots = validate.integer(n_slots, "slots", 1, MAX_SLOTS)
        self.slot_len = [0] * self.n_slots
        self._keep = []
        self._lock = ModelLock()
        # the token ids the KV cache holds, by position (-1: unknown), and how many tokens were
        # evaluated in all: the prefix cache of pyllama/kvcache.py reads them
        self.tokens = []
        self.n_evaluated = 0
        self._repack_budget = repack_budget() if validate.boolean(repack, "repack") else 0
        self._arena = None  # [array, bytes used] (_repack_buffer)
        self._weights = self._bind_weights(model_file)
        self._alloc_state(threads)
        _live.add(self)

    # -- binding ---------------------------------------------------------------------------------
    def _ptr(self, array, ctype="void *"):
        if array.ctypes.data % 4:
            # a legal but odd file (GGUF alignment 1 or 2, a V2 matrix of rows*cols % 4 != 0) puts
            # data at an unaligned address; C reads floats and fp16 scales: give it an aligned copy
            array = array.copy()
        buf = ffi.from_buffer(array)  # read-only buffers are fine: C only reads weights
        self._keep.append(buf)
        return ffi.cast(ctype, buf)

    def _tensor(self, dst, t):
        dst.data = self._ptr(t.data)
        dst.type = t.type
        dst.rows, dst.cols = t.shape
        if t.type == Q8_G:
            dst.scales = self._ptr(t.scales, "float *")
            dst.group_size = t.group_size
        else:
            dst.scales = ffi.NULL
            dst.group_size = 0

    def _matrix(self, dst, t):
        """A matmul weight: bound as the file has it, then repacked where this build's kernels
        have a layout of their own for its type (pl_repack: Q4_0, Q5_0, Q8_0, Q4_K, Q6_K with
        AVX-512 VNNI, Q4_0, Q5_0 and Q8_0 with AVX2 alone; float matrices as they are, into
        2 MiB pages, wide rows interleaved). The copy is as large as the tensor, made once at
        load time and shared by every Transformer over the same ModelFile,
        while the copies fit in half the memory available at load (beyond that the file's layout
        runs, slower, from the page cache). The embedding rows stay in the file."""
        self._tensor(dst, t)
        if self._repack_budget == 0:  # repack=False: every matrix runs from the file
            return
        done = self.file.repacked.get(t.name)
        if done is None:
            p = ffi.addressof(dst)
            n = int(lib.pl_repack_bytes(p))
            if t.type in FLOAT_TYPES and not isinstance(self.file.mmap, np.memmap):
                return  # read into memory already (mmap=False): its float layout needs no copy
            if not n or (self._repack_budget is not None and n > self._repack_budget):
                return
            if self._repack_budget is not None:
                self._repack_budget -= n
            arr = self._repack_buffer(n)
            done = self.file.repacked[t.name] = (arr, lib.pl_repack(p, self._ptr(arr), 1 if _forked
                                                                     else default_threads()))
            release_file_pages(self.file, t.data)
        dst.data, dst.type = self._ptr(done[0]), done[1]

    def _repack_buffer(self, n):
        """n bytes, 64-byte aligned, for a repacked copy: carved from arenas of at least
        ARENA_BYTES (aligned_buffer: 2 MiB pages where the kernel offers them, which the small
        matrices of a model would not get each on its own)."""
        arena = self._arena
        if arena is None or arena[1] + n > arena[0].size:
            arena = self._arena = [aligned_buffer(max(n, ARENA_BYTES)), 0]
        buf, off = arena
        arena[1] = off + (n + 63) // 64 * 64
        return buf[off:off + n]

    def _vector(self, t):
        """A float vector (norm, bias, rope_freqs) or NULL for an absent optional tensor."""
        if t is None:
            return ffi.NULL
        if t.type != F32:
            raise ParameterError(f"{t.name}: vector weights must be F32")  # readers guarantee it
        return self._ptr(t.data, "float *")

    def _bind_weights(self, mf):
        cfg, T = mf.config, mf.tensors
        arch = archs.get(mf.arch, mf.path)
        w = ffi.new("pl_weights *")
        layers = ffi.new("pl_layer[]", cfg["n_layers"])
        self._keep += [w, layers]
        c = w.cfg
        for key in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                    "seq_len", "head_dim"):
            setattr(c, key, cfg[key])
        c.rms_eps = cfg["rms_eps"]
        c.rope_theta = cfg["rope_theta"]
        c.rope_style = {"norm": lib.PL_ROPE_NORM, "neox": lib.PL_ROPE_NEOX}[arch.rope_style]
        self._tensor(w.token_embedding, T["token_embd.weight"])
        w.rms_final = self._vector(T["output_norm.weight"])
        self._matrix(w.wcls, T.get("output.weight", T["token_embd.weight"]))
        w.rope_freqs = self._vector(T.get("rope_freqs.weight"))
        fields = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        for l in range(cfg["n_layers"]):
            L, blk = layers[l], f"blk.{l}."
            L.rms_att = self._vector(T[blk + "attn_norm.weight"])
            L.rms_ffn = self._vector(T[blk + "ffn_norm.weight"])
            for field, name in zip(fields, archs.LAYER_MATRICES):
                self._matrix(getattr(L, field), T[f"{blk}{name}.weight"])
            for field, name in zip(("bq", "bk", "bv"), archs.BIASES):
                setattr(L, field, self._vector(T.get(blk + name)))
        w.layers = layers
        return w

    def kv_cache_bytes(self, n_ctx=None):
        return kv_position_bytes(self.config) * (n_ctx or self.n_ctx) * self.n_slots

    def _batch_size(self):
        """Tokens per pl_forward call: up to MAX_BATCH, fewer when the attention scores of a
        batch (batch, n_heads, n_ctx) would pass ATT_BYTES."""
        per_token = 4 * self.config["n_heads"] * self.n_ctx
        return int(max(1, min(MAX_BATCH, ATT_BYTES // per_token)))

    def _alloc_state(self, threads):
        cfg = self.config
        dim, hidden, n_ctx, vocab = cfg["dim"], cfg["hidden_dim"], self.n_ctx, cfg["vocab_size"]
        head_dim = cfg["head_dim"]
        q_dim = cfg["n_heads"] * head_dim
        nb = self._batch_size()
        kv_dim = head_dim * cfg["n_kv_heads"]
        # a kv head's positions together: one sequential stream per head for attention (csrc/internal.h: pl__kv_offset)
        kv_shape = (self.n_slots, cfg["n_layers"], cfg["n_kv_heads"], n_ctx, head_dim)
        scratch_bytes = int(lib.pl_scratch_bytes(self._weights, nb)) + 64
        need = (self.kv_cache_bytes() + scratch_bytes + 4 * nb * (
            cfg["n_heads"] * n_ctx + 3 * dim + max(dim, q_dim) + q_dim + 2 * hidden + vocab
            + 2 * kv_dim))
        avail = available_memory()
        if avail is not None and need > avail:
            raise MemoryError(f"the KV cache and buffers for a context of {n_ctx} positions need "
                              f"{need} bytes; only {avail} bytes of memory are available (ask for a "
                              f"smaller context)")
        f32 = np.float32
        bufs = dict(
            x=np.zeros((nb, dim), f32), xb=np.zeros((nb, max(dim, q_dim)), f32),
            xb2=np.zeros((nb, dim), f32), hb=np.zeros((nb, hidden), f32),
            hb2=np.zeros((nb, hidden), f32), q=np.zeros((nb, q_dim), f32),
            att=np.zeros((nb, cfg["n_heads"], n_ctx), f32),
            logits=np.zeros((nb, vocab), f32), rope=np.zeros((nb, head_dim), f32),
            key_cache=np.zeros(kv_shape, f32), value_cache=np.zeros(kv_shape, f32),
            k=np.zeros((nb, kv_dim), f32), v=np.zeros((nb, kv_dim), f32))
        scratch = np.zeros(scratch_bytes, np.uint8)
        for name, arr in (*bufs.items(), ("scratch", scratch)):
            if name != "logits":  # (a batch's rows of it, 64 MB for Llama 3's vocabulary, are
                touch_pages(arr)  # written only where every token's logits are asked for)
        s = ffi.new("pl_state *")
        self._keep.append(s)
        for name, arr in bufs.items():
            setattr(s, name, self._ptr(arr, "float *"))
        s.scratch = self._ptr(scratch)
        s.n_ctx = n_ctx
        s.n_slots = self.n_slots
        s.max_batch = nb
        self.max_batch = nb
        self._tokens = ffi.new("int[]", nb)
        self._batch_arrays = [ffi.new("int[]", nb) for _ in range(3)]  # pos, slot, want_logits
        self._batch = ffi.new("pl_batch *", [self._tokens, *self._batch_arrays, 0])
        self._bufs = bufs
        self._scratch = scratch
        self._state = s
        self.logits_buffer = bufs["logits"]
        self.logits_ptr = s.logits  # row 0: the last token's logits after a call
        self.threads = threads  # validated by the property setter

    @property
    def threads(self):
        """The most threads a step runs on (with the default, a token step may take fewer)."""
        return self._max_threads

    @threads.setter
    def threads(self, value):
        """An int: every step on that many threads. None: the default count (default_threads);
        then each one-token step runs on as many of them as such steps ran fastest on lately
        (ThreadTuner, pyllama/threadtune.py): when other processes share the cores, a team's
        members wait at its barriers for partners that are not running, and one thread each
        does more (two stories15M processes on 2 cores made 0.74x the tokens/s of one alone on
        both when each ran 2 threads, 0.88x when each ran one), so one-thread steps that find
        their core taken make it settle on one. Prompts (prefill, batches) keep the full count."""
        adapt = value is None
        if value is None and not _forked:
            value = default_threads(self.config)
        self._max_threads = self._state.n_threads = 1 if _forked else check_threads(value)
        self._tuner = ThreadTuner(self._max_threads) if adapt and self._max_threads > 1 else None

    def _track(self, pos, ids):
        del self.tokens[pos:]
        self.tokens.extend([-1] * (pos - len(self.tokens)))
        self.tokens.extend(ids)
        self.n_evaluated += len(ids)

    # -- running ---------------------------------------------------------------------------------
    def forward(self, token, pos):
        """Logits (a view of this Transformer's buffer, overwritten by the next call) for `token`
        at position `pos`; positions 0..pos-1 must already be in the KV cache."""
        if not 0 <= token < self.vocab_size:
            raise ParameterError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        if not 0 <= pos < self.n_ctx:
            raise ParameterError(f"position {pos} is outside the context (0..{self.n_ctx - 1})")
        self._tokens[0] = token
        self._track(pos, [token])
        tuner = self._tuner
        if tuner is None:
            lib.pl_forward(self._weights, self._state, self._tokens, 1, pos, lib.PL_LOGITS_LAST)
        else:
            key, self._state.n_threads = tuner.pick(1)
            t0, c0 = time.perf_counter(), time.thread_time()
            lib.pl_forward(self._weights, self._state, self._tokens, 1, pos, lib.PL_LOGITS_LAST)
            tuner.done(key, time.perf_counter() - t0, time.thread_time() - c0)
            self._state.n_threads = self._max_threads
        self.slot_len[0] = pos + 1
        return self.logits_buffer[0]

    def prefill(self, ids, pos=0, all_logits=False):
        """Run ids at positions pos.. in batches of max_batch. Returns the logits of every token
        ([len(ids), vocab], a new array) if all_logits; else None, and the last token's logits
        are in logits_buffer[0] (where the sampler reads them)."""
        n = len(ids)
        if n and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ParameterError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        if pos < 0 or pos + n > self.n_ctx:
            raise ParameterError(f"positions {pos}..{pos + n - 1} are outside the context "
                                 f"(0..{self.n_ctx - 1})")
        out = np.empty((n, self.vocab_size), np.float32) if all_logits else None
        self._track(pos, ids)
        for start in range(0, n, self.max_batch):
            chunk = ids[start:start + self.max_batch]
            self._tokens[0:len(chunk)] = chunk
            last = start + len(chunk) == n
            lib.pl_forward(self._weights, self._state, self._tokens, len(chunk), pos + start,
                           lib.PL_LOGITS_ALL if all_logits else
                           lib.PL_LOGITS_LAST if last else lib.PL_LOGITS_NONE)
            if all_logits:
                out[start:start + len(chunk)] = self.logits_buffer[:len(chunk)]
        self.slot_len[0] = pos + n
        return out

    # -- several sequences -----------------------------------------------------------------------
    def truncate(self, slot, n=0):
        """Keep only the first n positions of slot (0: empty it); later tokens overwrite the rest."""
        slot = validate.integer(slot, "slot", 0, self.n_slots - 1)
        self.slot_len[slot] = validate.integer(n, "positions", 0, self.slot_len[slot])

    def forward_batch(self, tokens, slots, want_logits):
        """Run one batch of tokens from any slots in one pass: tokens[i] goes into slot slots[i]
        at its next position (a slot's tokens follow each other in batch order). Returns the
        logits of the tokens with want_logits[i] true, one row each in batch order (a view of
        this Transformer's buffer, overwritten by the next call)."""
        n = len(tokens)
        if not 1 <= n <= self.max_batch or len(slots) != n or len(want_logits) != n:
            raise ParameterError(f"a batch holds 1..{self.max_batch} tokens with one slot and one "
                                 f"logits flag each, found {n} tokens, {len(slots)} slots and "
                                 f"{len(want_logits)} flags")
        tokens = validate.token_ids(tokens, self.vocab_size, "tokens")
        nxt = {}
        pos_a, slot_a, want_a = self._batch_arrays
        for i, slot in enumerate(slots):
            slot = validate.integer(slot, f"slots[{i}]", 0, self.n_slots - 1)
            pos = nxt.get(slot, self.slot_len[slot])
            if pos >= self.n_ctx:
                raise ParameterError(f"slot {slot} is full: its context holds {self.n_ctx} positions")
            nxt[slot] = pos + 1
            self._tokens[i], pos_a[i], slot_a[i] = tokens[i], pos, slot
            want_a[i] = 1 if want_logits[i] else 0
        self._batch.n = n
        lib.pl_forward_batch(self._weights, self._state, self._batch)
        for slot, length in nxt.items():
            self.slot_len[slot] = length
        return self.logits_buffer[:sum(1 for f in want_logits if f)]
