"""The build: ABI check, and a portable build (no -march=native, no OpenMP) that still works."""
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

from conftest import ROOT, shared_path

import pyllama


def test_abi_check_refuses_a_stale_core():
    stale = types.SimpleNamespace(pl_abi_version=lambda: pyllama.ABI_VERSION + 1,
                                  PL_ABI_VERSION=pyllama.ABI_VERSION + 1)
    with pytest.raises(ImportError, match="stale"):
        pyllama.check_abi(stale)
    pyllama.check_abi(pyllama._core.lib)


def test_build_info_and_openmp():
    info = pyllama.build_info()
    assert info.startswith("pyllama core")
    assert pyllama._core.lib.pl_max_threads() >= 1


def _build_copy(tmp_path, **env):
    """A copy of the source tree with its core built in place under `env`: (tree, build process)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        "*.so", "build", ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis"))
    proc = subprocess.run([sys.executable, "-c", "import build_ffi; build_ffi.ffibuilder.compile(tmpdir='.')"],
                          cwd=tree, env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tree, proc


KERNEL_TESTS = ("tests/test_quants.py", "tests/test_prefill.py", "tests/test_kernel_guards.py",
                "tests/test_kernels_repack.py", "tests/test_float_prompts.py")


def _core_of(tree, env):
    """(file, build_info) of the core `import pyllama` loads in `tree`."""
    info = subprocess.run([sys.executable, "-c", "import pyllama; print(pyllama._core.__file__); "
                           "print(pyllama.build_info())"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=60)
    where, flags = (info.stdout.splitlines() + ["", ""])[:2]
    assert where.startswith(str(tree)), info.stdout + info.stderr
    return where, flags


def _run_tests(tree, env, files):
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def test_avx2_build_without_avx512(tmp_path):
    """The x86-64-v3 target the project is specified for (AVX2, FMA, F16C, no AVX-512/VNNI), built
    on whatever CPU runs the tests: its kernel, prefill and parity tests pass (this machine's
    -march=native build takes the VNNI and 32-register paths instead)."""
    if not {"avx2", "fma", "f16c"} <= set(_cpu_flags()):
        pytest.skip("this CPU cannot run AVX2 code")
    tree, _ = _build_copy(tmp_path, PYLLAMA_NATIVE="0", PYLLAMA_CFLAGS="-mavx2 -mfma -mf16c")
    env = dict(os.environ, PYTHONPATH=str(tree), PYLLAMA_SHARED=str(shared_path()))
    _, flags = _core_of(tree, env)
    assert "avx2" in flags and "avx512" not in flags, flags
    _run_tests(tree, env, KERNEL_TESTS + ("tests/test_parity.py", "tests/test_arch.py::test_float_files_match_llamacpp",
                                           "tests/test_arch.py::test_every_quant_type_on_both_archs",
                                           "tests/test_threads.py::test_wide_float_rows_any_split",
                                           "tests/test_threads.py::test_wide_float_rows_interleaved"))


def test_avx2_build_without_f16c(tmp_path):
    """-mavx2 -mfma without -mf16c compiled nowhere (matmul.c and quants.c disagreed on what
    PL_AVX2 needs, and used F16C unguarded): it builds, takes the AVX2 kernels with an exact
    scalar fp16 conversion, and passes the kernel and prefill tests (bit-exact ones included)."""
    if not {"avx2", "fma"} <= set(_cpu_flags()):
        pytest.skip("this CPU cannot run AVX2 code")
    tree, _ = _build_copy(tmp_path, PYLLAMA_NATIVE="0", PYLLAMA_CFLAGS="-mavx2 -mfma")
    env = dict(os.environ, PYTHONPATH=str(tree), PYLLAMA_SHARED=str(shared_path()))
    _, flags = _core_of(tree, env)
    assert "avx2" in flags and "f16c" not in flags and "avx512" not in flags, flags
    _run_tests(tree, env, KERNEL_TESTS)


def test_portable_build_without_openmp(tmp_path):
    """PYLLAMA_NATIVE=0 with a compiler that rejects -fopenmp: the build warns, succeeds, runs
    single-threaded with the scalar (non-AVX2) kernels, still matches llama2.c's logits, and
    passes the kernel and prefill tests (the only run of the scalar quantized kernels)."""
    shared_path()
    fake_cc = tmp_path / "cc-no-openmp"
    fake_cc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do [ "$a" = "-fopenmp" ] && {{ echo "no OpenMP here" >&2; exit 1; }}; done
        exec {shutil.which('gcc') or 'cc'} "$@"
        """))
    fake_cc.chmod(0o755)
    tree, proc = _build_copy(tmp_path, CC=str(fake_cc), PYLLAMA_NATIVE="0", LDSHARED=f"{fake_cc} -shared")
    assert "WARNING: the C compiler has no OpenMP" in proc.stderr
    check = textwrap.dedent(f"""\
        import numpy as np, pyllama
        assert pyllama._core.__file__.startswith({str(tree)!r}), pyllama._core.__file__
        info = pyllama.build_info()
        assert "openmp" not in info and "avx2" not in info, info
        m = pyllama.Llama({str(shared_path('models/stories260K.bin'))!r}, threads=2)
        ref = np.load({str(shared_path('golden/logits/stories260K.npy'))!r})
        import json
        ids = [c for c in json.load(open({str(shared_path('golden/manifest.json'))!r}))["logits"]
               if c["name"] == "stories260K"][0]["ids"]
        got = m.logits(ids)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < 1e-4, err
        print("ok", info)
        """)
    env = dict(os.environ, PYTHONPATH=str(tree), PYLLAMA_SHARED=str(shared_path()))
    run = subprocess.run([sys.executable, "-c", check], cwd=tree, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")
    _run_tests(tree, env, KERNEL_TESTS)


# CPUs users build on (-march=native picks one of these kinds): AVX2-only Intel and AMD parts and
# the x86-64-v3 level, at the default optimisation and at -O1 (make asan's sanitizer build). A
# kernel that compiles only when the compiler happens to unroll a loop (an intrinsic whose
# immediate came from the loop variable) built here at -O3 on AVX-512 and failed on all of these.
COMPILE_TARGETS = ("haswell", "znver3", "x86-64-v3", "skylake-avx512")


def test_core_compiles_for_every_cpu_kind_and_optimisation_level():
    import build_ffi
    cflags = [f for f in build_ffi.build_flags()[0] if not f.startswith(("-march", "-O"))]
    jobs = []
    for march in COMPILE_TARGETS:
        for opt in ("-O1", "-O2", "-O3"):
            for src in sorted((ROOT / "csrc").glob("*.c")):
                cmd = build_ffi._compiler() + cflags + [opt, f"-march={march}", "-I", str(ROOT / "csrc"),
                                                        "-c", str(src), "-o", os.devnull]
                jobs.append((march, opt, src.name, subprocess.Popen(cmd, stderr=subprocess.PIPE)))
                if len(jobs) % 4 == 0:  # a few at a time
                    jobs[-4][3].wait()
    failed = [(m, o, s, p.communicate()[1].decode()[:300]) for m, o, s, p in jobs if p.wait() != 0]
    assert not failed, failed
