"""`make bench-avx2`: the AVX2-only path, side by side with llama.cpp built for AVX2 alone.

Machines of this kind differ: some have AVX-512 and VNNI, some only AVX2. This measures, on
whatever CPU runs it, what such a machine's builds do. pyllama's core is built into
build/avx2 (a copy of this tree, `PYLLAMA_NATIVE=0 PYLLAMA_CFLAGS="-mavx2 -mfma -mf16c"`), and
llama.cpp's `llama-bench` must be built by you for AVX2 alone, e.g.

    cmake -S llama.cpp -B build-avx2 -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
          -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build build-avx2 --target llama-bench

and given as --llama-bench (or LLAMA_BENCH=). Both run the same GGUF files, alternating, for
--rounds rounds: a prompt of --prompt tokens and --gen generated tokens at --threads threads;
the table gives each side's tokens/s and pyllama's divided by llama.cpp's. The first line names
the CPU. The script refuses a llama-bench whose code uses AVX-512 registers, and a pyllama build
that reports AVX-512.

    python benchmarks/avx2.py --llama-bench PATH [--big] [--rounds 2] [FILES...]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "avx2"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import llama3_1b, model_file  # noqa: E402
from machine import cpu_line  # noqa: E402

AVX2_ENV = {"PYLLAMA_NATIVE": "0", "PYLLAMA_CFLAGS": "-mavx2 -mfma -mf16c"}


def build_tree():
    """build/avx2: this tree's sources with an AVX2-only core built in place; its build info."""
    shutil.rmtree(TREE, ignore_errors=True)
    shutil.copytree(ROOT, TREE, ignore=shutil.ignore_patterns(
        "build", "dist", ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "*.so", "*.o",
        "_core.c", "*.bin", "*.gguf"))
    _run([sys.executable, "-c", "import build_ffi; build_ffi.ffibuilder.compile(tmpdir='.')"],
         cwd=TREE, env=dict(os.environ, **AVX2_ENV))
    out = _run([sys.executable, "-c", "import pyllama; print(pyllama._core.__file__); print(pyllama.build_info())"],
               cwd=TREE, env=_tree_env()).splitlines()
    if not out[0].startswith(str(TREE)) or "avx2" not in out[1].split() or "avx512" in out[1]:
        sys.exit(f"avx2.py: the core built in {TREE} is not an AVX2-only one: {out}")
    return out[1]


def _tree_env():
    return dict(os.environ, PYTHONPATH=str(TREE))


def _run(cmd, **kw):
    """stdout of cmd; a failed or missing command ends the script with its last lines."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw).stdout
    except FileNotFoundError:
        sys.exit(f"avx2.py: {cmd[0]} not found")
    except subprocess.CalledProcessError as e:
        sys.exit(f"avx2.py: {' '.join(map(str, cmd[:3]))} ... failed ({e.returncode}):\n{(e.stderr or '')[-2000:]}")


def check_llama_bench(path):
    """The llama-bench binary exists and none of its code names a 512-bit register."""
    if not Path(path).is_file():
        sys.exit(f"avx2.py: no llama-bench at {path} (build it as this script's docstring says)")
    dis = _run(["objdump", "-d", "--no-show-raw-insn", str(path)])
    if "zmm" in dis:
        sys.exit(f"avx2.py: {path} uses AVX-512 registers: build it with -DGGML_NATIVE=OFF -DGGML_AVX512=OFF")


def llama_cpp_run(bench, path, args):
    """(prompt tok/s, generation tok/s) from llama-bench's JSON."""
    out = _run([bench, "-m", str(path), "-t", str(args.threads), "-p", str(args.prompt),
                "-n", str(args.gen), "-r", str(args.repeat), "-o", "json"])
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == args.prompt and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == args.gen and r["n_prompt"] == 0)
    return pp, tg


def pyllama_run(path, args):
    """(prompt tok/s, generation tok/s): `pyllama bench --json` on the AVX2-only core, medians."""
    out = _run([sys.executable, "-m", "pyllama", "bench", str(path), "--threads", str(args.threads),
                "--repeat", str(args.repeat), "--gen", str(args.gen), "--prompt", str(args.prompt), "--json"],
               cwd=TREE, env=_tree_env())
    row = json.loads(out)[0]
    return row["prompt_tok_s"]["median"], row["gen_tok_s"]["median"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"),
                    help="llama.cpp's llama-bench built for AVX2 alone (or LLAMA_BENCH=)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternate the two projects this many times")
    ap.add_argument("--big", action="store_true", help="the Llama-3.2-1B-shaped files as well")
    ap.add_argument("files", nargs="*", type=Path, help="GGUF files (default: the bench files)")
    args = ap.parse_args()
    if not args.llama_bench:
        ap.error("--llama-bench (or LLAMA_BENCH=) is required: llama.cpp's llama-bench built for AVX2 alone")
    for name in ("threads", "prompt", "gen", "repeat", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    check_llama_bench(args.llama_bench)
    files = args.files or ([model_file("stories15M", "q4_k_m")] +  # its layers are Q5_0
                           [model_file("stories110M", t) for t in ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q6_k")] +
                           ([llama3_1b(t) for t in ("q8_0", "q4_0", "q4_k_m")] if args.big else []))
    files = [Path(f).resolve() for f in files]  # (pyllama runs in build/avx2)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        ap.error("no such file: " + ", ".join(missing))
    info = build_tree()
    print(cpu_line())
    print(f"pyllama: {info} (build/avx2); llama.cpp: {args.llama_bench} (no AVX-512 registers in its code)")
    print(f"{args.threads} threads, prompt {args.prompt} tokens, {args.gen} generated, {args.rounds} rounds "
          "alternating; tokens/s, and pyllama / llama.cpp")
    print(f"{'file':26} {'round':>5} {'llama.cpp pp':>12} {'pyllama pp':>10} {'ratio':>6} "
          f"{'llama.cpp tg':>12} {'pyllama tg':>10} {'ratio':>6}")
    for r in range(1, args.rounds + 1):
        for f in files:
            lpp, ltg = llama_cpp_run(args.llama_bench, f, args)
            ppp, ptg = pyllama_run(f, args)
            print(f"{Path(f).name:26} {r:5d} {lpp:12.1f} {ppp:10.1f} {ppp / lpp:5.2f}x "
                  f"{ltg:12.1f} {ptg:10.1f} {ptg / ltg:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
