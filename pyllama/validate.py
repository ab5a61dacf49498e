"""The one place arguments are checked: every public entry point (API, CLI, server) validates
through these functions, so the same bad value gets the same ParameterError everywhere.

Each function returns the value in its canonical Python type (int, float, bool, str, list[int])
or raises ParameterError naming the argument, what was expected and what was found. Numbers are
strict: bools, strings and floats with a fractional part are never taken for integers; strings
are never taken for numbers; only real bools are bools.
"""
import math
import numbers

import numpy as np

from .errors import ParameterError

__all__ = ["integer", "number", "boolean", "text", "choice", "token_ids", "optional"]


def _show(value):
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _range_text(lo, hi):
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def integer(value, name, lo=None, hi=None):
    """An int (Python or numpy integer; not bool, not float) within [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name}: expected an integer{_range_text(lo, hi)}, found {_show(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ParameterError(f"{name}: expected an integer{_range_text(lo, hi)}, found {value}")
    return value


def number(value, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite real number (int, float, numpy scalar; not bool, not str) within the bounds;
    lo_open/hi_open make a bound exclusive."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ParameterError(f"{name}: expected a number, found {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(f"{name}: expected a finite number, found {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
        bounds += [f"{'<' if hi_open else '<='} {hi}"] if hi is not None else []
        raise ParameterError(f"{name}: expected a number {' and '.join(bounds)}, found {value}")
    return value


def boolean(value, name):
    """True or False (or a numpy bool) — never a string, a number or None."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name}: expected True or False, found {_show(value)}")
    return bool(value)


def text(value, name):
    """A str."""
    if not isinstance(value, str):
        raise ParameterError(f"{name}: expected a string, found {_show(value)}")
    return value


def choice(value, name, options):
    """One of `options` (compared with ==)."""
    if value not in options:
        raise ParameterError(f"{name}: expected one of {', '.join(map(repr, options))}, found {_show(value)}")
    return value


def optional(check, value, *args, **kwargs):
    """None, or check(value, *args, **kwargs)."""
    return None if value is None else check(value, *args, **kwargs)


def token_ids(ids, vocab_size, name="ids", allow_empty=True):
    """A flat sequence of token ids as list[int]: a list/tuple of Python or numpy integers, or a
    1-D numpy integer array; each id in [0, vocab_size). Floats, bools, strings, None, nested
    sequences and other iterables are refused."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ParameterError(f"{name}: expected a 1-D array of integers, found an array of "
                                 f"shape {ids.shape} and dtype {ids.dtype}")
        out = ids.tolist()
    elif isinstance(ids, (list, tuple)):
        out = list(ids)
        for i, v in enumerate(out):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ParameterError(f"{name}[{i}]: expected an integer token id, found {_show(v)}")
            out[i] = int(v)
    else:
        raise ParameterError(f"{name}: expected a list of token ids, found {_show(ids)}")
    if not out and not allow_empty:
        raise ParameterError(f"{name}: expected at least one token id, found none")
    for i, v in enumerate(out):
        if not 0 <= v < vocab_size:
            raise ParameterError(f"{name}[{i}]: token id {v} is outside the vocabulary "
                                 f"(0..{vocab_size - 1})")
    return out
