"""pyllama: Llama-2-family inference with a hand-written C core.

    import pyllama
    with pyllama.Llama("stories15M.bin") as m:          # tokenizer.bin found beside the model
        for piece in m.generate("Once upon a time", steps=64, temperature=0):
            print(piece, end="", flush=True)
        ids = m.tokenize("Hello")                          # [1, 15043]
        logits = m.logits(ids)                             # numpy [len(ids), vocab]
"""
from ._version import __version__
from .errors import FormatError, ParameterError, PyllamaError, TokenizerError

try:
    from . import _core
except ImportError as e:  # pragma: no cover - a broken install
    raise ImportError(f"pyllama's compiled core is missing or broken ({e}); reinstall with "
                      f"`pip install .` from the source tree") from e

ABI_VERSION = 7


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
