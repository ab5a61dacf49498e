"""Which files pyllama opens and writes: a tokenizer.bin must fit its model, inputs must be regular
files (a FIFO would block forever), `convert` writes only regular files, reads every type `run`
reads, and its summary says what the file holds.

Where expected values come from: the shared files' documented sizes (../shared/golden/README.md:
stories260K has vocab 512, tokenizer.bin holds Llama 2's 32000 tokens, tok512.bin 512);
gguf-py's dequantizer for the converted tensors; `pyllama info`'s reading of the written file.
"""
import os
import shutil

import numpy as np
import pytest

from conftest import shared_path
from test_badinput import assert_cli_error, cli

import gguf
import pyllama
from pyllama import FormatError, ParameterError, TokenizerError
from pyllama import convert as C

S260K = "models/stories260K.bin"
TOK32K = "models/tokenizer.bin"
TOK512 = "models/tok512.bin"


# ---------------------------------------------------------------- item 4: tokenizer.bin size
def test_32k_tokenizer_for_a_512_model_is_refused_by_the_api():
    with pytest.raises(FormatError, match="holds 32000 tokens.*vocab_size is 512"):
        pyllama.Llama(shared_path(S260K), tokenizer=shared_path(TOK32K))
    with pytest.raises(FormatError, match="holds 32000 tokens"):
        pyllama.load_tokenizer(shared_path(TOK32K), 512)


def test_32k_tokenizer_found_beside_the_model_is_not_used(tmp_path):
    shutil.copy(shared_path(S260K), tmp_path / "m.bin")
    shutil.copy(shared_path(TOK32K), tmp_path / "tokenizer.bin")
    m = pyllama.Llama(tmp_path / "m.bin")          # logits need no tokenizer
    assert m.tokenizer is None and m.logits([1, 2]).shape == (2, 512)
    with pytest.raises(TokenizerError, match="holds 32000 tokens.*found beside the model"):
        m.tokenize("Once")
    shutil.copy(shared_path(TOK512), tmp_path / "tokenizer.bin")
    assert pyllama.Llama(tmp_path / "m.bin").tokenizer.vocab_size == 512


def test_32k_tokenizer_is_refused_by_the_cli(tmp_path):
    assert_cli_error(["run", shared_path(S260K), "-z", shared_path(TOK32K), "-n", "4"],
                     "holds 32000 tokens")
    shutil.copy(shared_path(S260K), tmp_path / "m.bin")
    shutil.copy(shared_path(TOK32K), tmp_path / "tokenizer.bin")
    assert_cli_error(["run", tmp_path / "m.bin", "-n", "4"], "found beside the model")


def test_tokenizer_with_missing_records_is_refused():
    with pytest.raises(FormatError, match="ends after 512 tokens.*vocab_size is 1000"):
        pyllama.load_tokenizer(shared_path(TOK512), 1000)


def test_convert_refuses_a_tokenizer_of_another_size(tmp_path):
    with pytest.raises(FormatError, match="holds 32000 tokens.*vocab_size is 512"):
        C.convert(shared_path(S260K), tmp_path / "o.gguf", tokenizer=shared_path(TOK32K))
    assert os.listdir(tmp_path) == []
    assert_cli_error(["convert", shared_path(S260K), tmp_path / "o.gguf", "-z",
                      shared_path(TOK32K)], "holds 32000 tokens")


# ---------------------------------------------------------------- item 7: non-regular files
def _fifo(tmp_path, name="fifo"):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def test_fifo_inputs_are_refused_not_waited_on(tmp_path):
    fifo = _fifo(tmp_path)
    for call in (lambda: pyllama.load(fifo), lambda: pyllama.Llama(fifo),
                 lambda: pyllama.load_tokenizer(fifo, 512),
                 lambda: pyllama.Llama(shared_path(S260K), tokenizer=fifo),
                 lambda: C.convert(fifo, tmp_path / "o.gguf"),
                 lambda: C.convert(shared_path(S260K), tmp_path / "o.gguf", tokenizer=fifo)):
        with pytest.raises(FormatError, match="is a FIFO"):
            call()
    with pytest.raises(FormatError, match="is a device"):
        pyllama.load("/dev/zero")
    with pytest.raises(FormatError, match="is a device"):
        pyllama.load_tokenizer("/dev/zero", 512)
    with pytest.raises(FormatError, match="is a directory"):
        pyllama.load(tmp_path)
    # the CLI too, within the subprocess timeout (a blocked open would hang it)
    assert_cli_error(["run", fifo], "is a FIFO")
    assert_cli_error(["run", shared_path(S260K), "-z", fifo], "is a FIFO")
    assert_cli_error(["info", fifo], "is a FIFO")


def test_symlinked_input_is_fine(tmp_path):
    os.symlink(shared_path(S260K), tmp_path / "link.bin")
    assert pyllama.load(tmp_path / "link.bin").config["vocab_size"] == 512


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling symlink", "device", "directory"])
def test_convert_refuses_non_regular_outputs(tmp_path, kind):
    src = shared_path("models/stories260K-f32.gguf")
    target = tmp_path / "target.gguf"
    target.write_bytes(b"keep me")
    out = tmp_path / "out.gguf"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        os.symlink(target, out)
    elif kind == "dangling symlink":
        os.symlink(tmp_path / "nowhere", out)
    elif kind == "device":
        out = "/dev/null"
    else:
        out.mkdir()
    what = {"fifo": "is a FIFO", "symlink": "is a symbolic link",
            "dangling symlink": "is a symbolic link", "device": "is a character device",
            "directory": "is a directory"}[kind]
    for typ in ("f32", "v2"):
        with pytest.raises(ParameterError, match=what):
            C.convert(src, out, typ)
    assert_cli_error(["convert", src, out], what)
    assert target.read_bytes() == b"keep me"
    if kind != "device":
        assert sorted(os.listdir(tmp_path)) == ["out.gguf", "target.gguf"]   # no .tmp left
        assert os.path.lexists(out)                                          # untouched


def test_convert_temporary_file_is_not_followed(tmp_path):
    """A link planted at the temporary name is not written through (exclusive creation)."""
    src = shared_path("models/stories260K-f32.gguf")
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    out = tmp_path / "out.gguf"
    os.symlink(target, f"{out}.{os.getpid()}.tmp")
    with pytest.raises(ParameterError, match="cannot write"):
        C.convert(src, out)
    assert target.read_bytes() == b"keep me" and not out.exists()


def test_convert_replaces_a_regular_file_keeping_permissions_of_new_files(tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    C.convert(shared_path("models/stories260K-f32.gguf"), out)
    assert out.read_bytes()[:4] == b"GGUF" and os.listdir(tmp_path) == ["out.gguf"]
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~mask


# ---------------------------------------------------------------- item 9: every type run reads
@pytest.mark.parametrize("qname", ["Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "Q4_K", "Q6_K"])
def test_convert_reads_every_type_run_reads(tmp_path, qname):
    from test_gguf_parity import write_model_gguf
    src = pyllama.load(shared_path("models/quant-base-f32.gguf"))
    path = write_model_gguf(tmp_path / f"m-{qname}.gguf", src, qname)
    C.convert(path, tmp_path / "f32.gguf", "f32")
    ours = pyllama.load(tmp_path / "f32.gguf")
    for t in gguf.GGUFReader(path).tensors:
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
        got = np.asarray(ours.tensors[t.name].data).view(np.float32).reshape(-1)
        assert np.array_equal(got, want), t.name


def test_convert_has_no_numpy_dequantizer_of_its_own():
    import inspect
    src = inspect.getsource(C)
    assert "_deq_" not in src and "pl_dequantize_row" in inspect.getsource(C.dequantize)


# ---------------------------------------------------------------- item 12: the v2 summary
def test_v2_summary_counts_what_the_file_holds(tmp_path):
    out = tmp_path / "m.bin"
    code, stdout, err = cli("convert", shared_path("models/quant-base-f32.gguf"), out,
                            "--type", "v2")
    assert code == 0, err
    info = C.convert(shared_path("models/quant-base-f32.gguf"), out, "v2")
    written = pyllama.load(out)
    want = {}
    for t in written.tensors.values():
        want[t.type_name] = want.get(t.type_name, 0) + 1
    assert info["counts"] == want and want == {"Q8_G": 30, "F32": 9}   # 4 layers: 28+2 / 8+1
    assert len(info["tensors"]) == 39
    assert b"39 tensors (9 F32, 30 Q8_G)" in stdout, stdout
