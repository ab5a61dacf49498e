"""The one type table (pyllama/formats/common.py GGML_TYPES) against its other sources.

Where expected values come from: csrc/pyllama.h (the C core's PL_* type numbers, read here from the
header text and from the compiled core) and gguf-py's GGML_QUANT_SIZES / GGMLQuantizationType
(llama.cpp's own numbering and block geometry).
"""
import re
from pathlib import Path

import gguf

from pyllama import _core
from pyllama import convert, quantize
from pyllama.formats import common, gguf as gguf_reader

HEADER = Path(__file__).resolve().parent.parent / "csrc" / "pyllama.h"


def _header_types():
    """The #defines of the header's "Tensor types" block (it ends at the first blank line)."""
    text = HEADER.read_text()
    block = text[text.index("/* Tensor types"):].split("\n\n", 1)[0]
    found = re.findall(r"^#define (PL_\w+) (\d+)", block, re.M)
    return {name[3:]: int(num) for name, num in found}


def test_header_and_table_agree():
    types = _header_types()
    assert len(types) >= 14 and "Q4_K" in types and "Q8_G" in types
    for name, num in types.items():
        assert common.GGML_TYPES[num][0] == name, (name, num)          # same number, same name
        assert getattr(_core.lib, "PL_" + name) == num                 # the compiled core agrees
    assert common.CORE_TYPES == frozenset(types.values())


def test_table_agrees_with_ggml():
    for t in gguf.GGMLQuantizationType:
        name, block, size = common.GGML_TYPES[int(t)]
        assert name == t.name
        if t in gguf.GGML_QUANT_SIZES:
            assert (block, size) == gguf.GGML_QUANT_SIZES[t]
    ggml_numbers = {int(t) for t in gguf.GGMLQuantizationType}
    assert set(common.GGML_TYPES) - ggml_numbers <= {common.Q8_G} | set(range(31, 39)) | {4, 5}


def test_one_table():
    """Every module uses the table in formats/common.py: no second copy of the numbers."""
    assert gguf_reader.GGML_TYPES is common.GGML_TYPES
    assert gguf_reader.SUPPORTED_TYPES == common.CORE_TYPES - {common.Q8_G}
    for mod in (convert, quantize):
        assert mod.GGML_TYPES is common.GGML_TYPES
        assert mod.Q4_K == common.Q4_K == _core.lib.PL_Q4_K
    assert not hasattr(common, "TYPES")          # "TYPES" no longer means two things
    assert set(convert.OUTPUT_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k"}
    assert common.type_name(common.Q6_K) == "Q6_K" and common.type_name(99) == "unknown type 99"
