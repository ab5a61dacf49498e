"""pyllama: Llama-2-family inference with a hand-written C core.

    import pyllama
    with pyllama.Llama("stories15M.bin") as m:          # tokenizer.bin found beside the model
        for piece in m.generate("Once upon a time", steps=64, temperature=0):
            print(piece, end="", flush=True)
        ids = m.tokenize("Hello")                          # [1, 15043]
        logits = m.logits(ids)                             # numpy [len(ids), vocab]
"""
import os

from ._version import __version__
from .errors import FormatError, ParameterError, PyllamaError, TokenizerError

# GNU OpenMP reads its spin budget once, when the core loads it. Its default lets an idle thread
# of the team spin for about 300,000 pauses (~15 ms here) before it sleeps: between two tokens
# that holds a core another process needs, and two processes that each use all cores slow each
# other down 3-20x. 2000 pauses (~0.1 ms, about the Python work between two forward calls) keeps
# one process's team awake from token to token and lets a crowded machine have the cores back.
# The barriers inside a forward pass are pyllama's own (csrc/threads.c). A user's setting wins;
# so does a libgomp that another module loaded first. The variable is removed again once libgomp
# has read it, so that programs started from this process (other OpenMP users) do not inherit it.
_set_spin = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
if _set_spin:
    os.environ["GOMP_SPINCOUNT"] = "2000"

try:
    from . import _core
except ImportError as e:  # pragma: no cover - a broken install
    raise ImportError(f"pyllama's compiled core is missing or broken ({e}); reinstall with "
                      f"`pip install .` from the source tree") from e
finally:
    if _set_spin:
        del os.environ["GOMP_SPINCOUNT"]

ABI_VERSION = 10


def check_abi(lib):
    """Refuse a compiled core built from another version of csrc/pyllama.h (a stale build)."""
    found = lib.pl_abi_version()
    if found != ABI_VERSION or lib.PL_ABI_VERSION != ABI_VERSION:
        raise ImportError(f"pyllama's compiled core has ABI version {found}, this Python code "
                          f"expects {ABI_VERSION}: the build is stale; reinstall with `pip install .`")


check_abi(_core.lib)

from .formats import load  # noqa: E402
from .llama import Llama, load_tokenizer  # noqa: E402
from .tokenizers import BPETokenizer, Tokenizer  # noqa: E402

__all__ = ["Llama", "Tokenizer", "BPETokenizer", "load", "load_tokenizer", "FormatError", "ParameterError", "PyllamaError",
           "TokenizerError", "__version__", "build_info"]


def build_info():
    """How the C core was compiled: OpenMP, SIMD paths."""
    return _core.ffi.string(_core.lib.pl_build_info()).decode()
