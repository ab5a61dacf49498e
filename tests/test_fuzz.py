"""Fuzzing the file readers: thousands of mutated model and tokenizer files end in success or a
pyllama exception, never a crash, a hang or another exception (tests/fuzz/fuzz_models.py).

The inputs are mutations of small valid files the fuzzer writes itself (no ../shared needed), so
the expected outcome is the documented contract, not recorded values. CI uses a fixed seed, so a
failure names a case that replays anywhere:

    python tests/fuzz/fuzz_models.py --seed SEED --case N

Knobs: PYLLAMA_FUZZ_COUNT (default 20000 inputs, about 15 s here), PYLLAMA_FUZZ_SEED (default
20240601; "random" picks one and prints it). Failing inputs are kept in build/fuzz/.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FUZZ = ROOT / "tests" / "fuzz" / "fuzz_models.py"
DEFAULT_SEED = 20240601
SUMMARY = re.compile(r"^fuzz: (\d+) inputs, (\d+) crashes, (\d+) hangs, (\d+) unexpected "
                     r"exceptions \((.*)\) in [\d.]+ s, seed (\d+)$", re.M)

sys.path.insert(0, str(FUZZ.parent))
import fuzz_models  # noqa: E402


def run_fuzzer(*args, timeout=600):
    proc = subprocess.run([sys.executable, str(FUZZ), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    m = SUMMARY.search(proc.stdout)
    assert m, f"no summary line (status {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
              f"{proc.stderr[-3000:]}"
    counts = dict(zip(("inputs", "crashes", "hangs", "unexpected"), map(int, m.groups()[:4])))
    detail = dict((k, int(v)) for v, k in re.findall(r"(\d+) (?:rejected with )?(\w+)",
                                                    m.group(5)))
    return proc, counts, detail


def fuzz_seed():
    value = os.environ.get("PYLLAMA_FUZZ_SEED", "")
    if value == "random":
        return int.from_bytes(os.urandom(4), "little")
    return int(value) if value else DEFAULT_SEED


def test_mutated_files_fail_cleanly():
    count = int(os.environ.get("PYLLAMA_FUZZ_COUNT", "20000"))
    seed = fuzz_seed()
    out = ROOT / "build" / "fuzz" / f"test-seed{seed}"
    proc, counts, detail = run_fuzzer("--count", count, "--seed", seed, "--out", out)
    print(proc.stdout.strip().splitlines()[-1])
    failures = "\n".join(l for l in proc.stdout.splitlines() if "FAILURE" in l)
    assert (counts["crashes"], counts["hangs"], counts["unexpected"]) == (0, 0, 0), (
        f"fuzz seed {seed}: failing inputs saved in {out}; replay one with\n  python {FUZZ} "
        f"--seed {seed} --case N\n{failures}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert counts["inputs"] == count
    # the mutations reach both sides: most files are refused, a fair share still runs
    assert detail.get("FormatError", 0) > count // 2, detail
    assert detail.get("loaded", 0) > count // 20, detail


def test_harness_reports_crashes_hangs_and_stray_exceptions(tmp_path):
    """Failures injected into chosen cases are each caught, counted and saved, and the batch goes
    on after a crash or a hang."""
    inject = {2: "crash", 5: "exit", 8: "hang", 11: "stuck", 14: "unexpected", 17: "memory"}
    proc, counts, _ = run_fuzzer(
        "--count", 20, "--seed", 5, "--out", tmp_path, "--hang-seconds", 1, "--grace", 2,
        "--selftest", ",".join(f"{k}@{n}" for n, k in inject.items()), timeout=120)
    assert proc.returncode == 1
    assert counts == dict(inputs=20, crashes=2, hangs=2, unexpected=2), proc.stdout
    saved = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".bin", ".gguf"))
    assert sorted(int(re.search(r"case(\d+)", n).group(1)) for n in saved) == sorted(inject), saved
    for n in inject:
        assert f"seed 5 case {n}" in proc.stdout
    note = next(tmp_path.glob("crash-seed5-case2-*.txt")).read_text()
    # the worker's stderr: faulthandler's traceback, or AddressSanitizer's report under `make asan`
    assert ("signal SIGSEGV" in note and "Fatal Python error" in note) or \
        "AddressSanitizer: SEGV" in note, note[-2000:]


def test_cases_are_reproducible():
    seeds = fuzz_models.make_seeds()
    again = fuzz_models.make_seeds()
    assert [s.data for s in seeds] == [s.data for s in again]
    for i in (0, 1, 17, 999):
        a = fuzz_models.make_case(seeds, 42, i)
        b = fuzz_models.make_case(seeds, 42, i)
        assert (a[0].name, a[1], a[3]) == (b[0].name, b[1], b[3])
    assert fuzz_models.make_case(seeds, 42, 1)[1] != fuzz_models.make_case(seeds, 43, 1)[1]


@pytest.mark.parametrize("name", [s.name for s in fuzz_models.make_seeds()])
def test_seed_files_are_valid(tmp_path, name):
    """Every seed the mutations start from loads and runs (the vocab-only GGUF is refused as a
    model, by design), so the mutations test the readers, not a broken seed."""
    runner = fuzz_models.Runner(tmp_path, 0)
    try:
        seed = next(s for s in runner.seeds if s.name == name)
        path = runner.case_path(0, seed)
        Path(path).write_bytes(seed.data)
        for heap in (False, True):
            runner.heap = heap
            status, label = runner.run_bytes(seed, seed.data, 1, path)
            if "vocab-only" in name:
                assert (status, label) == ("accepted", "FormatError")
            else:
                assert (status, label) == ("ok", "loaded"), (name, heap, status, label)
    finally:
        runner.close()
