"""`pyllama bench`: prompt and generation speed of one model, and the machine's read bandwidth.

Generation reads every weight byte once per token, plus the keys and values of every earlier
position (the KV cache, float32), so bytes read per second against the measured read bandwidth
says how close a run is to the memory wall.
"""
import os
import statistics
import time

import numpy as np

from ._core import ffi, lib
from .model import kv_position_bytes


CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"
DEFAULT_LLC = 32 << 20          # when the cache size cannot be read
MIN_PROBE, MAX_PROBE = 64 << 20, 1 << 30
SEGMENT = 32                    # generated tokens between two probes
SETTLED = 1.15                  # a segment counts when its two probes differ by at most this factor


def last_level_cache(cache_dir=CACHE_DIR):
    """Bytes of the largest data/unified cache of CPU 0 (Linux sysfs), else DEFAULT_LLC."""
    best = 0
    try:
        for entry in os.listdir(cache_dir):
            base = os.path.join(cache_dir, entry)
            try:
                with open(os.path.join(base, "type")) as f:
                    if f.read().strip() == "Instruction":
                        continue
                with open(os.path.join(base, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * scale)
    except OSError:
        pass
    return best or DEFAULT_LLC


def probe_bytes(model_bytes, llc):
    """The bandwidth probe's size: past the caches (4x the last level) and at least what a token
    reads, within [MIN_PROBE, MAX_PROBE]; 0 (no probe) when the weights fit in the cache, where a
    DRAM bandwidth figure says nothing about the run."""
    if model_bytes <= llc:
        return 0
    return int(min(max(4 * llc, model_bytes, MIN_PROBE), MAX_PROBE))


def read_bandwidth(threads, nbytes, repeat=5):
    """Median bytes/s of summing an f32 array of `nbytes` (larger than the caches)."""
    x = np.ones(nbytes // 4, np.float32)
    ptr = ffi.cast("float *", ffi.from_buffer(x))
    lib.pl_sum_f32(ptr, x.size, threads)  # warm: pages mapped, threads started
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        lib.pl_sum_f32(ptr, x.size, threads)
        rates.append(x.nbytes / (time.perf_counter() - t0))
    return statistics.median(rates)


def bytes_per_token(model_file):
    """Weight bytes one generated token reads: every matrix and norm, one embedding row (all of
    it when the classifier is tied to the embedding)."""
    t = model_file.tensors
    total = sum(x.nbytes for name, x in t.items() if name != "token_embd.weight")
    emb = t["token_embd.weight"]
    return total + (emb.nbytes if model_file.shared_classifier else emb.nbytes // emb.shape[0])


def kv_bytes_read(config, p0, p1):
    """Bytes of the KV cache that the tokens at positions p0 .. p1-1 read: the one at position p
    reads the float32 keys and values of positions 0..p in every layer."""
    return kv_position_bytes(config) * ((p1 * (p1 + 1) - p0 * (p0 + 1)) // 2)


def _stats(values):
    v = sorted(values)
    return {"min": v[0], "median": statistics.median(v), "max": v[-1]}


def bench(llama, threads, n_prompt=128, n_gen=256, repeat=3, probe=0):
    """{prompt_tok_s, gen_tok_s: {min, median, max}, ...} for one Llama at `threads`.

    With a probe size (probe_bytes), a probe of the read bandwidth runs before the generation and
    after every SEGMENT tokens of it (its time not counted), and the row gets read_bandwidth (the
    probes' stats) and bandwidth_fraction: the median over the settled segments of the bytes the
    segment read (weights, and the KV cache at its positions) per second over the mean of the two
    probes around it. This machine's bandwidth moves with its neighbours' load, by up to 2x within
    seconds: a segment whose two probes differ by more than SETTLED ran partly at one rate and
    partly at another, and no probe says which; it is left out (counted in unsettled_segments)."""
    llama.threads = threads
    rng = np.random.default_rng(0)
    n_prompt = min(n_prompt, llama.n_ctx - 1)
    n_gen = min(n_gen, llama.n_ctx)
    prompt = [1] + rng.integers(3, llama.vocab_size, size=n_prompt - 1).tolist()
    pp, tg, bw, frac, unsettled = [], [], [], [], 0
    per_token = bytes_per_token(llama.file)
    config = llama.config
    segments = probe and n_gen >= SEGMENT
    for _ in range(repeat):
        t0 = time.perf_counter()
        llama.logits(prompt, last_only=True)  # the prompt's prefill
        pp.append(n_prompt / (time.perf_counter() - t0))
        if segments:
            bw.append(read_bandwidth(threads, probe, repeat=1))
        # between the yields of tokens n and n + 1, the forward pass at position n runs (the
        # first yield follows the pass at position 0): a segment ending at yield n covers
        # positions n - SEGMENT .. n - 1
        n, elapsed, t0 = 0, 0.0, time.perf_counter()
        for _ in llama.generate_tokens([1], n_gen, temperature=0.0, seed=1, stop=False):
            n += 1
            if segments and n % SEGMENT == 0:
                dt = time.perf_counter() - t0
                elapsed += dt
                before = bw[-1]
                bw.append(read_bandwidth(threads, probe, repeat=1))
                if max(before, bw[-1]) <= SETTLED * min(before, bw[-1]):
                    read = per_token * SEGMENT + kv_bytes_read(config, n - SEGMENT, n)
                    frac.append(read / dt / ((before + bw[-1]) / 2))
                else:
                    unsettled += 1
                t0 = time.perf_counter()
        elapsed += time.perf_counter() - t0
        tg.append(n / elapsed)
    return {"threads": threads, "prompt_tokens": n_prompt, "gen_tokens": n_gen,
            "prompt_tok_s": _stats(pp), "gen_tok_s": _stats(tg), "bytes_per_token": per_token,
            "kv_bytes_per_token": kv_bytes_read(config, 0, n_gen) / n_gen,
            "read_bandwidth": _stats(bw) if segments else None,
            "bandwidth_fraction": statistics.median(frac) if frac else None,
            "settled_segments": len(frac), "unsettled_segments": unsettled}


def time_to_first_token(path, tokenizer=None, threads=None):
    """Seconds from nothing to the first sampled token of a one-token prompt (file warm)."""
    from .llama import Llama
    t0 = time.perf_counter()
    m = Llama(path, tokenizer=tokenizer, threads=threads)
    pairs = m.generate_tokens([1], 2, temperature=0.0, seed=1, stop=False)
    next(pairs)  # (1, the first sampled token): the prompt's forward pass and one sample
    elapsed = time.perf_counter() - t0
    pairs.close()
    return elapsed


def run(args, out, err):
    """The `pyllama bench` command."""
    import json
    from .llama import Llama
    threads = args.threads or [lib.pl_max_threads()]
    m = Llama(args.model, tokenizer=None if not args.tokenizer else args.tokenizer)
    per_token = bytes_per_token(m.file)
    llc = last_level_cache()
    probe = probe_bytes(per_token, llc)
    rows = []
    for th in threads:
        r = bench(m, th, args.prompt, args.gen, args.repeat, probe)
        r["time_to_first_token_ms"] = _stats([time_to_first_token(args.model, args.tokenizer, th)
                                              * 1000 for _ in range(args.repeat)])
        r["last_level_cache"] = llc
        r["cache_resident"] = probe == 0
        r["model"] = args.model
        rows.append(r)
    if args.json:
        out.write((json.dumps(rows, indent=2) + "\n").encode())
        return 0
    kv = rows[0]["kv_bytes_per_token"] if rows else 0
    out.write(f"{args.model}: {m.file.format}, {per_token / 1e6:.1f} MB of weights read per token, "
              f"{kv / 1e6:.1f} MB of KV cache on average over {rows[0]['gen_tokens'] if rows else 0} tokens\n".encode())
    for r in rows:
        out.write(f"  {format_row(r)}\n".encode())
    return 0


def format_row(r):
    """One --threads row of the text report."""
    pp, tg, ttft = r["prompt_tok_s"], r["gen_tok_s"], r["time_to_first_token_ms"]
    wall = ("cache-resident (the weights fit in the "
            f"{r['last_level_cache'] / 2**20:.0f} MiB last-level cache)" if r["cache_resident"]
            else f"{r['bandwidth_fraction'] * 100:.0f}% of the read bandwidth measured around its "
                 f"segments (weights and KV cache; {r['read_bandwidth']['median'] / 1e9:.1f} GB/s; "
                 f"{r['settled_segments']} of {r['settled_segments'] + r['unsettled_segments']} "
                 f"segments settled)"
            if r["bandwidth_fraction"] is not None
            else "the read bandwidth moved during every segment: no bandwidth figure"
            if r.get("unsettled_segments") else "too few tokens for a bandwidth figure")
    return (f"threads {r['threads']}: prompt ({r['prompt_tokens']} tokens) "
            f"{pp['median']:.1f} tok/s [{pp['min']:.1f}..{pp['max']:.1f}], generate "
            f"{tg['median']:.1f} tok/s [{tg['min']:.1f}..{tg['max']:.1f}], {wall}, first token "
            f"{ttft['median']:.1f} ms [{ttft['min']:.1f}..{ttft['max']:.1f}]")
