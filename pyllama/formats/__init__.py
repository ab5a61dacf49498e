"""Model file readers. `load(path)` detects the format from the file's first bytes."""
import os

import numpy as np

from ..errors import FormatError
from .common import ModelFile, Tensor, TYPES, type_name  # noqa: F401
from .llama2c import read_llama2c

GGUF_MAGIC = b"GGUF"


def open_map(path, mmap=True):
    """The one read-only map of a file, after checking that it is a readable regular file.

    mmap=False reads the file into memory instead: slower to load, but immune to the file being
    truncated or rewritten on disk while in use (a mapped file truncated under a running model
    makes the process die of SIGBUS, as with every mmap-based runner)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory, not a model file")
    try:
        with open(path, "rb"):
            pass
        size = os.path.getsize(path)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        raise FormatError(f"{path}: unsupported format: the file is empty")
    if mmap:
        return np.memmap(path, dtype=np.uint8, mode="r")
    data = np.fromfile(path, dtype=np.uint8)
    data.flags.writeable = False
    return data


def load(path, mmap=True, tokenizer=True) -> ModelFile:
    """Read a model file (llama2.c legacy/V1/V2 .bin or GGUF) into a ModelFile of views into one
    read-only map of it (or, with mmap=False, one in-memory copy). tokenizer=False: a GGUF
    file's vocabulary is not turned into a Tokenizer (its metadata is still there)."""
    path = os.fspath(path)
    mm = open_map(path, mmap)
    if bytes(mm[:4]) == GGUF_MAGIC:
        from .gguf import read_gguf
        return read_gguf(path, mm, tokenizer=tokenizer)
    return read_llama2c(path, mm)
