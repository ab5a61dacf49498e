"""`make bench-serve`: aggregate generated tokens/s of 1, 2, 4, 8 streaming HTTP clients.

Starts `pyllama serve MODEL --parallel 8` (a subprocess on a free port of 127.0.0.1), then for each
client count k runs k threads, each streaming one greedy /v1/completions request after another
(a fixed random token-id prompt, --gen tokens, the stop ids biased away so every stream runs its
length), and reports the completion tokens all clients received per second of wall time (best of
--repeat), time to first token and the ratio to one client. benchmarks/serve_scaling.py measures
the engine alone, without HTTP. --model: files or shape names (stories15M, stories110M: synthetic
weights as GGUF Q8_0, made and cached by benchmarks/bench.py; llama3-1b: the Llama-3.2-1B shape
as Q8_0, build/bench-models/llama3-1b-q8_0.gguf), one table each.

--llama-server PATH: llama.cpp's server side by side: `PATH -m MODEL -np 8 -c 8*CTX -t THREADS`
(its -c is shared by the -np slots, so each slot gets pyllama's per-slot context CTX) on another
free port, driven by the same clients with the same prompts (its logit_bias in its list form,
ignore_eos), each figure measured right after pyllama's (interleaved, so load on the machine
hits both alike); the table adds its tok/s and the ratio pyllama / llama-server.

    python benchmarks/serve_clients.py [--model FILE|SHAPE,...] [--clients 1,2,4,8] [--gen 128]
                                       [--llama-server PATH] [--json FILE]
"""
import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama  # noqa: E402
from machine import cpu_line  # noqa: E402

SHAPES = ("stories15M", "stories110M", "llama3-1b")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(http, server, prompt, gen):
    """One streamed completion: (completion tokens, seconds to the first text, seconds)."""
    t0 = time.perf_counter()
    first, n = None, 0
    body = dict(prompt=prompt, max_tokens=gen, temperature=0, stream=True, **server.extra)
    with http.stream("POST", server.url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for event in sse_events(r.iter_bytes()):
            if event["choices"] and first is None:
                first = time.perf_counter() - t0
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
    return n, first, time.perf_counter() - t0


def sse_events(chunks):
    """The JSON `data:` events of a server-sent event stream, split at line feeds only (as the
    SSE format says: a text may hold U+2028 or \x1c, where str.splitlines would cut it)."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data: {"):
                yield json.loads(line[6:])


def run_clients(server, k, prompts, gen):
    def client(i):
        with httpx.Client(timeout=600) as http:
            return stream_one(http, server, prompts[i], gen)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(k) as pool:
        res = list(pool.map(client, range(k)))
    wall = time.perf_counter() - t0
    return sum(r[0] for r in res), wall, statistics.median(r[1] for r in res)


class Server:
    """A server subprocess on a free port of 127.0.0.1; extra: its request fields."""

    def __init__(self, name, cmd, extra):
        self.name, self.extra = name, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([c.replace("{port}", str(self.port)) for c in cmd],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                sys.exit(f"{name} did not start (exit status {self.proc.poll()})")
            time.sleep(0.2)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def resolve(model):
    if model not in SHAPES:
        return Path(model)
    from bench import llama3_1b, model_file
    return llama3_1b("q8_0") if model == "llama3-1b" else model_file(model, "q8_0")


def measure(model, args, clients):
    """The rows of one model file: pyllama's figures (and llama-server's, interleaved)."""
    mf = pyllama.load(model)
    vocab = mf.config["vocab_size"]
    tok = pyllama.load_tokenizer(model, vocab)  # (its stop ids are biased away)
    stops = sorted(getattr(tok, "stop_ids", None) or {tok.eos_id})
    mf.close()
    ctx, parallel, threads = args.prompt + args.gen + 8, max(clients), args.threads or os.cpu_count()
    servers = []
    try:
        servers.append(Server("pyllama serve", [
            sys.executable, "-m", "pyllama", "serve", str(model), "--port", "{port}", "--parallel",
            str(parallel), "--ctx-size", str(ctx), "--threads", str(threads)],
            dict(logit_bias={str(t): -1e4 for t in stops}, stream_options={"include_usage": True})))
        if args.llama_server:
            servers.append(Server("llama-server", [
                args.llama_server, "-m", str(model), "--host", "127.0.0.1", "--port", "{port}",
                "-np", str(parallel), "-c", str(parallel * ctx), "-t", str(threads), "-tb", str(threads)],
                dict(logit_bias=[[t, -1e4] for t in stops], ignore_eos=True)))
        rng = np.random.default_rng(0)
        prompts = [[1] + rng.integers(3, vocab, size=args.prompt - 1).tolist() for _ in range(parallel)]
        for server in servers:
            run_clients(server, 1, prompts, 8)  # warm up
        rows = []
        for k in clients:
            best = [None] * len(servers)
            for _ in range(args.repeat):
                for j, server in enumerate(servers):
                    n, wall, ttft = run_clients(server, k, prompts, args.gen)
                    if best[j] is None or n / wall > best[j][0] / best[j][1]:
                        best[j] = (n, wall, ttft)
            row = dict(clients=k)
            for server, (n, wall, ttft) in zip(servers, best):
                key = "" if server is servers[0] else "llama_server_"
                row.update({key + "tokens": n, key + "tok_s": n / wall, key + "ttft_ms": 1e3 * ttft})
            rows.append(row)
    finally:
        for server in servers:
            server.close()
    return rows


def report(model, args, clients, rows):
    lcpp = bool(args.llama_server)
    for key in ("", "llama_server_") if lcpp else ("",):
        one = rows[0][key + "tok_s"] if rows[0]["clients"] == 1 else None
        for r in rows:
            r[key + "ratio"] = r[key + "tok_s"] / one if one else None
    print(f"{Path(str(model)).name} over HTTP (`pyllama serve --parallel {max(clients)}`"
          f"{f' beside `llama-server -np {max(clients)}`' if lcpp else ''}): {args.prompt}-token "
          f"prompts, {args.gen} tokens per streamed request, best of {args.repeat}")
    head = f"{'clients':>7} {'tok/s':>9} {'vs 1 client':>11} {'TTFT ms':>8}"
    print(head + (f" {'llama-server':>12} {'vs 1 client':>11} {'pyllama/l-s':>11}" if lcpp else ""))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        line = f"{r['clients']:>7} {r['tok_s']:>9.1f} {ratio:>11} {r['ttft_ms']:>8.1f}"
        if lcpp:
            r["vs_llama_server"] = r["tok_s"] / r["llama_server_tok_s"]
            lratio = f"{r['llama_server_ratio']:.2f}x" if r["llama_server_ratio"] else ""
            line += f" {r['llama_server_tok_s']:>12.1f} {lratio:>11} {r['vs_llama_server']:>10.2f}x"
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories15M",
                    help=f"model files or shapes ({', '.join(SHAPES)}), comma-separated (default: stories15M)")
    ap.add_argument("--clients", default="1,2,4,8", help="concurrent streaming clients to measure")
    ap.add_argument("--gen", type=int, default=128, help="tokens each client's request generates")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens of each request")
    ap.add_argument("--threads", type=int, default=None, help="server threads (default: all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (best is kept)")
    ap.add_argument("--llama-server", default=None, metavar="PATH",
                    help="llama.cpp's llama-server binary: measure it side by side")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.llama_server and not os.access(args.llama_server, os.X_OK):
        sys.exit(f"--llama-server: {args.llama_server} is not an executable file")
    print(cpu_line())
    out = []
    for name in args.model.split(","):
        model = resolve(name)
        rows = measure(model, args, clients)
        report(model, args, clients, rows)
        out.append(dict(model=str(model), rows=rows))
    if not args.llama_server:
        print("llama.cpp's llama-server was not measured side by side (pass --llama-server PATH).")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cpu=cpu_line(), models=out), indent=1))


if __name__ == "__main__":
    main()
