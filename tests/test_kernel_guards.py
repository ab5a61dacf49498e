"""The C kernels on a tensor type they do not know: Python never passes one (every reader refuses
unknown types), but if one got through, the output must be loudly wrong (NaN everywhere), not
left as whatever the buffer held. Expected values: the rule stated in csrc/kernels.h."""
import numpy as np
import pytest

from pyllama._core import ffi, lib

BOGUS = (99, -1, 1 << 20)


def _tensor(ptype, data, rows, cols):
    t = ffi.new("pl_tensor *")
    buf = ffi.from_buffer(data)
    t.data = ffi.cast("void *", buf)
    t.scales = ffi.NULL
    t.type = ptype
    t.group_size = 0
    t.rows, t.cols = rows, cols
    return t, buf


@pytest.mark.parametrize("ptype", BOGUS)
def test_dequantize_row_of_an_unknown_type_is_nan(ptype):
    data = np.zeros(4 * 64, np.uint8)
    t, keep = _tensor(ptype, data, 4, 64)
    out = np.zeros(64, np.float32)  # before: left at 0.0, a plausible value
    lib.pl_dequantize_row(t, 2, ffi.cast("float *", ffi.from_buffer(out)))
    assert np.all(np.isnan(out))


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ptype", BOGUS)
def test_matmul_of_an_unknown_type_is_nan(ptype, threads, n):
    rows, cols = 6, 64
    data = np.zeros(rows * cols * 4, np.uint8)
    t, keep = _tensor(ptype, data, rows, cols)
    x = np.ones((n, cols), np.float32)
    out = np.zeros((n, rows), np.float32)
    scratch = np.zeros(lib.pl_matmul_scratch_bytes(t, n) + 64, np.uint8)
    lib.pl_matmul(ffi.cast("float *", ffi.from_buffer(out)), ffi.cast("float *", ffi.from_buffer(x)),
                  n, t, ffi.from_buffer(scratch), threads)
    assert np.all(np.isnan(out))
