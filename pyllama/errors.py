"""pyllama's exception family: every error a user can cause derives from PyllamaError."""


class PyllamaError(Exception):
    """Base class of every error pyllama raises on purpose."""


class FormatError(PyllamaError, ValueError):
    """A model or tokenizer file is malformed, truncated, inconsistent or of an unsupported kind.

    The message names the file, the field or offset, and what was expected versus found.
    """


class TokenizerError(PyllamaError, ValueError):
    """Text cannot be tokenized (no tokenizer loaded, invalid UTF-8, ...) or ids cannot be decoded."""


class ParameterError(PyllamaError, ValueError):
    """An argument is out of range (steps, temperature, top-p, threads, token ids, context ...)."""


class BusyError(PyllamaError):
    """Every slot is busy and the waiting queue is full: retry later (a server answers 503)."""
