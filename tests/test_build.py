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


def test_portable_build_without_openmp(tmp_path):
    """PYLLAMA_NATIVE=0 with a compiler that rejects -fopenmp: the build warns, succeeds, runs
    single-threaded with the scalar (non-AVX2) kernels, and still matches llama2.c's logits."""
    shared_path()
    fake_cc = tmp_path / "cc-no-openmp"
    fake_cc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do [ "$a" = "-fopenmp" ] && {{ echo "no OpenMP here" >&2; exit 1; }}; done
        exec {shutil.which('gcc') or 'cc'} "$@"
        """))
    fake_cc.chmod(0o755)
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        "*.so", "build", ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis"))
    env = dict(os.environ, CC=str(fake_cc), PYLLAMA_NATIVE="0", LDSHARED=f"{fake_cc} -shared")
    proc = subprocess.run([sys.executable, "-c", "import build_ffi; build_ffi.ffibuilder.compile(tmpdir='.')"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    run = subprocess.run([sys.executable, "-c", check], cwd=tree, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(tree)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")
