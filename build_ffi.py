"""cffi build of pyllama's C core (out-of-line API mode) into pyllama._core.

The cdef is the text of csrc/pyllama.h, which every C file also includes, so the Python view of
the API and the compiled code cannot drift. Build knobs (environment variables, read at build
time, i.e. during `pip install`):

    PYLLAMA_NATIVE=0     do not pass -march=native (portable build; scalar kernels on CPUs
                         without AVX2 are chosen by the compiler's own target flags)
    PYLLAMA_OPENMP=0     build without OpenMP (single-threaded)
    PYLLAMA_CFLAGS="…"   extra compiler flags, appended last (e.g. "-O1 -g -fsanitize=address")
    PYLLAMA_LDFLAGS="…"  extra linker flags
"""
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


def _flag_on(name, default=True):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "no", "off", "false")


def _compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def _compiles(flags):
    """True when the C compiler accepts `flags` on a small OpenMP program and links it."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.c"
        src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        try:
            proc = subprocess.run(_compiler() + flags + [str(src), "-o", str(Path(tmp) / "t")],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0


def build_flags():
    cflags = ["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
    ldflags = []
    if _flag_on("PYLLAMA_NATIVE"):
        cflags.append("-march=native")
    if _flag_on("PYLLAMA_OPENMP"):
        if _compiles(["-fopenmp"]):
            cflags.append("-fopenmp")
            ldflags.append("-fopenmp")
        else:
            print("pyllama: WARNING: the C compiler has no OpenMP (-fopenmp failed); "
                  "building a single-threaded core", file=sys.stderr)
            cflags.append("-Wno-unknown-pragmas")
    else:
        cflags.append("-Wno-unknown-pragmas")
    cflags += shlex.split(os.environ.get("PYLLAMA_CFLAGS", ""))
    ldflags += shlex.split(os.environ.get("PYLLAMA_LDFLAGS", ""))
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef((CSRC / "pyllama.h").read_text())
_cflags, _ldflags = build_flags()
ffibuilder.set_source(
    "pyllama._core",
    '#include "pyllama.h"\n',
    sources=sorted(str(p.relative_to(HERE)) for p in CSRC.glob("*.c")),
    include_dirs=[str(CSRC.relative_to(HERE))],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
