"""Model file readers. `load(path)` detects the format from the file's first bytes."""
import os
import stat

import numpy as np

from ..errors import FormatError
from .common import GGML_TYPES, ModelFile, Tensor, type_name  # noqa: F401
from .llama2c import read_llama2c

GGUF_MAGIC = b"GGUF"


def _open_regular(path, what="model file"):
    """The file at `path` opened for reading, after checking (on the open descriptor, so nothing
    can be swapped in between) that it is a regular file: a FIFO would block the reader forever,
    a device or a directory is no model file. Opening never blocks (O_NONBLOCK)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise FormatError(f"{path}: is {kind}, not a {what}")
    return os.fdopen(fd, "rb")


def read_file(path, what="file"):
    """The bytes of a regular file (checked as open_map checks), e.g. a tokenizer.bin."""
    with _open_regular(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise FormatError(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None


def open_map(path, mmap=True):
    """The one read-only map of a file, after checking that it is a readable regular file.

    mmap=False reads the file into memory instead: slower to load, but immune to the file being
    truncated or rewritten on disk while in use (a mapped file truncated under a running model
    makes the process die of SIGBUS, as with every mmap-based runner)."""
    path = os.fspath(path)
    with _open_regular(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise FormatError(f"{path}: unsupported format: the file is empty")
        try:
            if mmap:
                return np.memmap(f, dtype=np.uint8, mode="r")
            data = np.fromfile(f, dtype=np.uint8)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    data.flags.writeable = False
    return data


def load(path, mmap=True) -> ModelFile:
    """Read a model file (llama2.c legacy/V1/V2 .bin or GGUF) into a ModelFile of views into one
    read-only map of it (or, with mmap=False, one in-memory copy). A GGUF file's vocabulary stays
    metadata: pyllama.tokenizers builds the tokenizer from it."""
    path = os.fspath(path)
    mm = open_map(path, mmap)
    if bytes(mm[:4]) == GGUF_MAGIC:
        from .gguf import read_gguf
        return read_gguf(path, mm)
    return read_llama2c(path, mm)
