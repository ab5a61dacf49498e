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


def test_seed_zero_is_time_based_and_fixed_seed_repeats(s260k):
    model, tok = s260k
    runs = [cli("run", model, "-z", tok, "-s", "77", "-n", "60")[1] for _ in range(2)]
    assert runs[0] == runs[1]


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
    p = subprocess.run(f"{sys.executable} -m pyllama run {model} -z {tok} -n 200 -s 1 | head -c 5",
                       shell=True, capture_output=True, timeout=120)
    assert p.stdout == b"Once "[:5] or len(p.stdout) == 5
    assert b"Traceback" not in p.stderr


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
