"""The `pyllama` command line: help, version, every flag of `run`, chat, info."""
import json
import subprocess
import sys

import pytest

from conftest import shared_path

import pyllama


def cli(*args, input=None, cwd=None):
    p = subprocess.run([sys.executable, "-m", "pyllama", *map(str, args)], capture_output=True,
                       input=input, timeout=300, cwd=cwd)
    return p.returncode, p.stdout, p.stderr.decode()


@pytest.fixture
def s260k():
    return shared_path("models/stories260K.bin"), shared_path("models/tok512.bin")


def test_help_and_version():
    code, out, _ = cli("--help")
    assert code == 0 and b"run" in out and b"info" in out
    code, out, _ = cli("run", "--help")
    for flag in (b"--temperature", b"--topp", b"--seed", b"--steps", b"--input", b"--tokenizer",
                 b"--mode", b"--system", b"--threads", b"-t T", b"-p P", b"-s S", b"-n N", b"-z PATH"):
        assert flag in out, flag
    code, out, _ = cli("--version")
    assert code == 0 and out.decode().startswith(f"pyllama {pyllama.__version__}")


def test_no_command_prints_help():
    code, out, _ = cli()
    assert code == 1 and b"usage" in out


def test_short_and_long_flags_agree(s260k):
    model, tok = s260k
    a = cli("run", model, "-z", tok, "-t", "0.8", "-p", "0.5", "-s", "3", "-n", "40", "-i", "Tim")
    b = cli("run", model, "--tokenizer", tok, "--temperature", "0.8", "--topp", "0.5",
            "--seed", "3", "--steps", "40", "--prompt", "Tim", "--threads", "1")
    assert a[0] == b[0] == 0 and a[1] == b[1] and a[1].startswith(b"Tim")


def test_llama2c_style_invocation_without_run(s260k):
    model, tok = s260k
    a = cli(model, "-z", tok, "-t", "0", "-n", "20", "-i", "One day")
    b = cli("run", model, "-z", tok, "-t", "0", "-n", "20", "-i", "One day")
    assert a[0] == 0 and a[1] == b[1]


def test_steps_count_prompt_and_clamp(s260k):
    model, tok = s260k
    code, out, err = cli("run", model, "-z", tok, "-t", "0", "-n", "5", "-i", "Once upon a time")
    # 5 positions: the 4 prompt tokens are forced and 1 token is sampled after them
    assert out == b"Once upon a time,\n"
    code2, out2, _ = cli("run", model, "-z", tok, "-t", "0", "-n", "100000", "-i", "Once")
    code3, out3, _ = cli("run", model, "-z", tok, "-t", "0", "-n", "0", "-i", "Once")
    assert code2 == code3 == 0 and out2 == out3


def test_fixed_seed_repeats(s260k):
    model, tok = s260k
    runs = [cli("run", model, "-z", tok, "-s", "77", "-n", "60")[1] for _ in range(2)]
    assert runs[0] == runs[1]


def run_in_process(capsysbinary, *args):
    """`pyllama ARGS` in this process (so the test can replace the clock): (status, stdout)."""
    from pyllama.cli import main
    code = main([str(a) for a in args])
    return code, capsysbinary.readouterr().out


def test_seed_zero_is_the_clock(s260k, capsysbinary, monkeypatch):
    """llama2.c: `-s 0` (the default) seeds with (unsigned int) time(NULL), the whole seconds."""
    import time
    model, tok = s260k
    args = ("run", model, "-z", tok, "-n", "60", "-i", "Once")
    fixed = {s: run_in_process(capsysbinary, *args, "-s", s) for s in ("1700000000", "1700000001")}
    assert fixed["1700000000"][1] != fixed["1700000001"][1]
    for now, seed in ((1700000000.25, "1700000000"), (1700000000.99, "1700000000"),
                      (1700000001.5, "1700000001")):
        monkeypatch.setattr(time, "time", lambda: now)
        assert run_in_process(capsysbinary, *args, "-s", "0") == fixed[seed]
        assert run_in_process(capsysbinary, *args) == fixed[seed]  # 0 is the default


def test_atoi_as_glibc():
    """C's atoi as glibc computes it, (int) strtol(s, NULL, 10); expected values worked out by
    hand from C's rules (strtol clamps to a 64-bit long; the cast to int keeps the low 32 bits)."""
    from pyllama.cli import atoi, llama2c_seed
    cases = {"42": 42, "-5": -5, "+7": 7, "  \t\n12": 12, "5x": 5, "12.9": 12, "1e3": 1, "x": 0,
             "": 0, "- 5": 0, "0x10": 0, "٣": 0,  # ARABIC-INDIC DIGIT THREE is not a C digit
             "2147483647": 2**31 - 1, "2147483648": -2**31, "4294967295": -1, "4294967296": 0,
             "4294967301": 5, "-2147483649": 2**31 - 1,
             "99999999999999999999": -1,     # clamped to 2^63-1 = 0x7fff_ffff_ffff_ffff → -1
             "-99999999999999999999": 0}     # clamped to -2^63 → low 32 bits 0
    for text, expected in cases.items():
        assert atoi(text) == expected, text
    # run.c: unsigned long long rng_seed = atoi(...): a negative int wraps modulo 2^64
    assert llama2c_seed("-1") == 2**64 - 1
    assert llama2c_seed("2147483648") == 2**64 - 2**31 == 18446744071562067968
    assert llama2c_seed("4294967301") == 5


def test_seeds_beyond_int32_wrap_as_in_llama2c(s260k):
    """`-s 2147483648` is run.c's seed 2^64 - 2^31 (atoi wraps to INT_MIN, then unsigned long
    long): the same text as the API with that seed, and as `-s -2147483648`."""
    model, tok = s260k
    base = ("run", model, "-z", tok, "-n", "60", "-i", "Once")
    big = cli(*base, "-s", "2147483648")
    assert big[0] == 0
    assert big[1] == cli(*base, "-s", "-2147483648")[1]
    m = pyllama.Llama(model, tokenizer=tok)
    expected = "".join(m.generate("Once", steps=60, seed=2**64 - 2**31, echo=True)) + "\n"
    assert big[1].decode() == expected
    assert cli(*base, "-s", "4294967301")[1] == cli(*base, "-s", "5")[1] == cli(*base, "-s", "5abc")[1]
    assert cli(*base, "-s", "2147483648")[1] != cli(*base, "-s", "2147483647")[1]


def test_tokenizer_default_is_beside_the_model(tmp_path, s260k):
    import shutil
    model, tok = s260k
    shutil.copy(model, tmp_path / "m.bin")
    shutil.copy(tok, tmp_path / "tokenizer.bin")
    code, out, err = cli("run", tmp_path / "m.bin", "-t", "0", "-n", "20", "-i", "One day")
    assert code == 0, err
    assert out == cli("run", model, "-z", tok, "-t", "0", "-n", "20", "-i", "One day")[1]


def test_chat_mode_reads_turns_from_stdin(s260k):
    model, tok = s260k
    code, out, err = cli("run", model, "-z", tok, "-m", "chat", "-t", "0", "-n", "120",
                         input=b"be brief\nHello there\nAnd again\n")
    assert code == 0, err
    text = out.decode()
    assert text.startswith("Enter system prompt (optional): User: Assistant: ")
    code2, out2, _ = cli("chat", model, "-z", tok, "-t", "0", "-n", "120", "-y", "be brief",
                         "-i", "Hello there", input=b"And again\n")
    assert code2 == 0
    # same conversation, with the first two turns given as flags instead of typed
    assert out2.decode() == text.replace("Enter system prompt (optional): User: ", "", 1)


def test_chat_ends_at_eof(s260k):
    model, tok = s260k
    code, out, err = cli("chat", model, "-z", tok, "-n", "300", input=b"")
    assert code == 0, err


def test_info_text_and_json(s260k):
    model, _ = s260k
    code, out, err = cli("info", model)
    assert code == 0, err
    text = out.decode()
    assert "llama2c-legacy" in text and "blk.4.ffn_up.weight" in text and "F32" in text
    code, out, _ = cli("info", "--json", model)
    info = json.loads(out)
    assert info["config"]["dim"] == 64 and info["config"]["n_kv_heads"] == 4
    assert len(info["tensors"]) == 2 + 9 * 5
    assert info["total_tensor_bytes"] == sum(t["bytes"] for t in info["tensors"])


def test_info_bad_file(tmp_path):
    code, out, err = cli("info", tmp_path / "none.gguf")
    assert code == 1 and err.startswith("pyllama: error: ") and "no such file" in err


def test_broken_pipe_is_quiet(s260k):
    model, tok = s260k
    full = cli("run", model, "-z", tok, "-n", "200", "-s", "1")[1]
    assert len(full) > 100
    p = subprocess.run(f"{sys.executable} -m pyllama run {model} -z {tok} -n 200 -s 1 | head -c 5",
                       shell=True, capture_output=True, timeout=120)
    assert p.stdout == full[:5]
    assert b"Traceback" not in p.stderr


def sh(command, input=None):
    p = subprocess.run(["sh", "-c", command], capture_output=True, input=input, timeout=120)
    return p.returncode, p.stdout, p.stderr.decode()


@pytest.mark.parametrize("redirect", ["<&-", "2>&-", "<&- 2>&-"])
def test_closed_stdin_or_stderr_still_succeeds(s260k, redirect):
    """Closed (not /dev/null: `<&-`, `2>&-`) stdin or stderr: the run is the same, status 0
    (`2>&-` turned success into a traceback and status 1)."""
    model, tok = s260k
    args = f"-z {tok} -n 40 -s 3 -i Once"
    expected = cli("run", model, *args.split())[1]
    code, out, err = sh(f"{sys.executable} -m pyllama run {model} {args} {redirect}")
    assert (code, out) == (0, expected), err
    assert "Traceback" not in err


def test_closed_stdin_ends_chat(s260k):
    model, tok = s260k
    code, out, err = sh(f"{sys.executable} -m pyllama chat {model} -z {tok} -n 50 <&-")
    assert code == 0 and out.startswith(b"Enter system prompt (optional): "), err
    assert "Traceback" not in err


def test_closed_stdout_is_one_error_line(s260k):
    model, tok = s260k
    code, out, err = sh(f"{sys.executable} -m pyllama run {model} -z {tok} -n 40 >&-")
    assert code == 1
    assert err == "pyllama: error: standard output is closed or not writable: nothing to write " \
                  "the output to\n"
    code, _, err = sh(f"{sys.executable} -m pyllama run {model} -z {tok} -n 40 >&- 2>&-")
    assert code == 1 and err == ""
    code, _, err = sh(f"{sys.executable} -m pyllama info {model} 1</dev/null")  # read-only
    assert code == 1 and err.startswith("pyllama: error: standard output is closed or not writable")


def test_values_starting_with_a_dash(s260k):
    """llama2.c takes the word after a flag as its value: `-i "-dash"` is a prompt."""
    model, tok = s260k
    code, out, err = cli("run", model, "-z", tok, "-t", "0", "-n", "20", "-i", "-dash")
    assert code == 0, err
    assert out.startswith(b"-dash") and out == cli("run", model, "-z", tok, "-t", "0", "-n", "20",
                                                   "--prompt=-dash")[1]
    a = cli(model, "-z", tok, "-n", "30", "-s", "-7", "-i", "--")
    assert a[0] == 0 and a[1].startswith(b"--") and a[1] == cli(model, "-z", tok, "-n", "30", "-s=-7", "-i=--")[1]
    code, out, err = cli("chat", model, "-z", tok, "-t", "0", "-n", "60", "-y", "-sys", "-i", "-hi")
    assert code == 0, err


def test_chat_input_must_be_utf8_like_the_command_line(s260k):
    """Typed chat lines were silently replaced with U+FFFD while -i refused invalid UTF-8: both
    refuse it now, with the same one-line message."""
    model, tok = s260k
    code, out, err = cli("chat", model, "-z", tok, "-n", "60", "-y", "", input=b"hi \xff there\n")
    assert code == 1 and err == "pyllama: error: chat input is not valid UTF-8: byte 3 is 0xff\n"
    code, out, err = cli("chat", model, "-z", tok, "-n", "60", "-y", "", "-i", "hi \udcff there")
    assert code == 1 and err == "pyllama: error: --prompt is not valid UTF-8: byte 3 is 0xff\n"


def test_bench_json(s260k):
    model, _ = s260k
    code, out, err = cli("bench", model, "--threads", "1,2", "--repeat", "1", "--gen", "8",
                         "--prompt", "4", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["threads"] for r in rows] == [1, 2]
    for r in rows:
        assert r["gen_tok_s"]["min"] > 0 and r["prompt_tok_s"]["median"] > 0
        assert r["bytes_per_token"] > 1_000_000 and r["time_to_first_token_ms"]["min"] > 0
        assert r["cache_resident"] is (r["bandwidth_fraction"] is None)   # tests/test_bench.py
    code, out, err = cli("bench", model, "--repeat", "0")
    assert code == 1 and "--repeat" in err


def test_convert_then_run(tmp_path, s260k):
    model, tok = s260k
    out = tmp_path / "m.gguf"
    code, _, err = cli("convert", model, out, "--type", "f32", "-z", tok)
    assert code == 0, err
    a = cli("run", out, "-t", "0", "-n", "40", "-i", "One day")
    b = cli("run", model, "-z", tok, "-t", "0", "-n", "40", "-i", "One day")
    assert a[0] == 0 and a[1] == b[1]
    code, _, err = cli("convert", model, tmp_path / "x.gguf", "--type", "q3_xs", "-z", tok)
    assert code == 1 and err.startswith("pyllama: error:")


def test_no_repack_flag_reaches_the_model(s260k, capsysbinary, monkeypatch):
    """--no-repack: run and serve build their models with repack=False (README "Speed"); the text
    is the same either way (the float copy holds the file's bytes)."""
    from pyllama import llama as llama_mod, server
    model, tok = s260k
    seen, real = [], llama_mod.Transformer
    monkeypatch.setattr(llama_mod, "Transformer", lambda *a, **k: seen.append(k["repack"]) or real(*a, **k))
    args = ("run", model, "-z", tok, "-s", "5", "-n", "40")
    default, plain = run_in_process(capsysbinary, *args), run_in_process(capsysbinary, *args, "--no-repack")
    assert seen == [True, False] and default == plain and default[0] == 0 and default[1]
    served = []
    monkeypatch.setattr(server, "serve", lambda m, **k: served.append((k["repack"], k["ctx_size"])))
    for extra in ((), ("--no-repack", "-c", "0")):
        assert run_in_process(capsysbinary, "serve", model, "-z", tok, *extra)[0] == 0
    assert served == [(True, None), (False, 0)]  # -c 0 reaches the server: the model's context
