"""`make bench-compare`: pyllama and llama-cpp-python on the same GGUF files, side by side.

For each file: load time, prompt processing (128 tokens) and streaming generation through each
project's public Python API (the same call on both: `create_completion(PROMPT, max_tokens=GEN,
temperature=0, stream=True)`, its tokens counted by count_tokens; --gen, default 128), 2 threads,
medians; the first line of the output names the CPU. llama-cpp-python runs in a child process of
the Python given by --llama-python (default: this one; install it with `pip install -e
'.[bench]'`, which builds llama.cpp from source and takes minutes).
"""
import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYLLAMA_SHARED") or ROOT.parent / "shared")
MODELS = ROOT / "build" / "bench-models"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line  # noqa: E402
PROMPT = "Once upon a time"


def count_tokens(stream, max_tokens):
    """Generated tokens of a streamed completion, consumed here. Chunks are not tokens: both
    projects end with a chunk that only says why, and pyllama sends no chunk for a token whose
    bytes end inside a character (they go out with the next one). A stream that ran to its
    length made max_tokens; one that stopped earlier is counted by its chunks with text (a lower
    bound: a stop string's own tokens send none)."""
    n, reason = 0, None
    for chunk in stream:
        choice = chunk["choices"][0]
        n += bool(choice["text"])
        reason = choice["finish_reason"] or reason
    return max_tokens if reason == "length" else n


CHILD = r'''
import json, sys, time
import numpy as np
from llama_cpp import Llama
COUNT_TOKENS
path, n_gen, n_prompt, threads, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_ctx=max(512, n_prompt + n_gen + 16), n_threads=threads, n_threads_batch=threads,
            n_batch=512, n_ubatch=512, verbose=False)
load = time.perf_counter() - t0
res = {"load_s": load, "gen": [], "prompt": []}
rng = np.random.default_rng(0)
ids = [1] + rng.integers(3, llm.n_vocab(), size=n_prompt - 1).tolist()
for _ in range(repeat):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    res["prompt"].append(n_prompt / (time.perf_counter() - t0))
    llm.reset()
    t0 = time.perf_counter()
    n = count_tokens(llm.create_completion(PROMPT, max_tokens=n_gen, temperature=0.0, stream=True), n_gen)
    res["gen"].append(n / (time.perf_counter() - t0))
    res["gen_tokens"] = n
print(json.dumps(res))
'''.replace("PROMPT", repr(PROMPT)).replace("COUNT_TOKENS", inspect.getsource(count_tokens))


def pyllama_run(path, n_gen, n_prompt, threads, repeat):
    import numpy as np
    import pyllama
    t0 = time.perf_counter()
    m = pyllama.Llama(path, threads=threads, n_ctx=max(512, n_prompt + n_gen + 16))
    res = {"load_s": time.perf_counter() - t0, "gen": [], "prompt": []}
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, m.vocab_size, size=n_prompt - 1).tolist()
    for _ in range(repeat):
        t0 = time.perf_counter()
        m.logits(ids, last_only=True)  # the prompt's prefill
        res["prompt"].append(n_prompt / (time.perf_counter() - t0))
        t0 = time.perf_counter()  # the same call and count as llama-cpp-python's (CHILD)
        n = count_tokens(m.create_completion(PROMPT, max_tokens=n_gen, temperature=0.0, stream=True), n_gen)
        res["gen"].append(n / (time.perf_counter() - t0))
        res["gen_tokens"] = n
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the stories110M files")
    ap.add_argument("--big", action="store_true",
                    help="only the Llama-3.2-1B-shaped files (`benchmarks/bench.py --big` makes them)")
    # two rounds: each project runs each file twice, alternating, so a change of the machine's state
    # during one project's turn (its read rate moves by up to 2x within minutes) weighs on both
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two projects this many times")
    ap.add_argument("files", nargs="*", type=Path, help="GGUF files (default: the bench files)")
    args = ap.parse_args()
    for name in ("threads", "gen", "prompt", "repeat", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    files = [SHARED / "models" / "stories260K-f32.gguf"]
    for name in ["stories15M"] + ([] if args.quick else ["stories110M"]):
        files += [MODELS / f"{name}-{t}.gguf" for t in ("f32", "f16", "q8_0", "q4_0", "q4_k_m")]
    if args.big:
        files = [MODELS / f"llama3-1b-{t}.gguf" for t in ("q8_0", "q4_0", "q4_k_m")]
    files = args.files or files
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        sys.exit(f"missing {missing}: run `make bench` first (it makes and converts the models)")
    print(cpu_line())
    print(f"side by side in this run (each file: llama-cpp-python, then pyllama, {args.rounds} round(s)), "
          f"{args.threads} threads, prompt {args.prompt} tokens, medians of {args.repeat * args.rounds}")
    print(f"{'file':26} {'':10} {'load ms':>8} {'prompt tok/s':>13} {'stream tok/s':>13}")
    for f in files:
        rows = {"llama-cpp": {"prompt": [], "gen": []}, "pyllama": {"prompt": [], "gen": []}}
        for _ in range(args.rounds):  # interleaved: the shared machine's load hits both alike
            proc = subprocess.run([args.llama_python, "-c", CHILD, str(f), str(args.gen), str(args.prompt),
                                   str(args.threads), str(args.repeat)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"llama-cpp-python failed on {f}:\n{proc.stderr[-2000:]}")
            for who, r in (("llama-cpp", json.loads(proc.stdout.strip().splitlines()[-1])),
                           ("pyllama", pyllama_run(f, args.gen, args.prompt, args.threads, args.repeat))):
                rows[who]["load_s"] = r["load_s"]
                rows[who]["prompt"] += r["prompt"]
                rows[who]["gen"] += r["gen"]
                rows[who]["gen_tokens"] = r["gen_tokens"]
        for who, r in rows.items():
            print(f"{f.name:26} {who:10} {r['load_s'] * 1000:8.1f} {statistics.median(r['prompt']):13.1f} "
                  f"{statistics.median(r['gen']):13.1f}"
                  + ("" if rows["pyllama"]["gen_tokens"] == rows["llama-cpp"]["gen_tokens"]
                     else f"  ({r['gen_tokens']} tokens)"))
        a, b = rows["pyllama"], rows["llama-cpp"]
        print(f"{'':26} {'ratio':10} {b['load_s'] / a['load_s']:7.1f}x "
              f"{statistics.median(a['prompt']) / statistics.median(b['prompt']):12.2f}x "
              f"{statistics.median(a['gen']) / statistics.median(b['gen']):12.2f}x", flush=True)


if __name__ == "__main__":
    main()
