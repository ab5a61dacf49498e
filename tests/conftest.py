"""Shared fixtures: where ../shared is, the golden manifest, synthetic checkpoints.

Expected values come from ../shared/golden (see its README: llama2.c run.c/runq.c at 350e04f and
llama.cpp at c392e50 produced them). When ../shared is missing the tests that need it SKIP on a
developer machine and FAIL in CI (CI=true), so a broken CI setup cannot pass silently.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PYLLAMA_SHARED") or ROOT.parent / "shared").resolve()
CACHE = ROOT / "build" / "test-models"  # regenerated synthetic checkpoints (gitignored)


def shared_path(rel=""):
    """Path inside ../shared; skip (or fail under CI) when it is not there."""
    if not (SHARED / "golden" / "manifest.json").is_file():
        msg = f"../shared not found at {SHARED} (set PYLLAMA_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED / rel


def assert_refused(path, read, *fragments):
    """read(path) must raise FormatError naming the file and every fragment; returns the message."""
    from pyllama.errors import FormatError
    with pytest.raises(FormatError) as e:
        read(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def manifest():
    return json.loads(shared_path("golden/manifest.json").read_text())


def cases(kind, pred=lambda c: True):
    """Golden cases of one kind for parametrize; read lazily so a missing ../shared fails loudly
    in the test, not at collection."""
    path = SHARED / "golden" / "manifest.json"
    if not path.is_file():
        return [pytest.param(None, id="shared-missing")]
    return [pytest.param(c, id=c.get("name") or f"{Path(c['model']).stem}-{i}")
            for i, c in enumerate(json.loads(path.read_text())[kind]) if pred(c)]


def synthetic_model(args, sha256):
    """Regenerate a make_model.py checkpoint (cached under build/) and check its sha256."""
    args = [str(a) for a in args]
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(" ".join(args).encode()).hexdigest()[:16]
    out = CACHE / f"{key}.bin"
    if not out.is_file() or _sha256(out) != sha256:
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, str(shared_path("tools/make_model.py")), *args,
                        "--out", str(tmp)], check=True)
        tmp.replace(out)
    got = _sha256(out)
    assert got == sha256, f"make_model.py {' '.join(args)} gave sha256 {got}, manifest says {sha256}"
    return out


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_of(case):
    """The model file of a golden case: a file in models/ or a regenerated synthetic one."""
    if "model" in case:
        return shared_path(case["model"])
    args = case["make_model_args"]
    if isinstance(args, str):
        args = json.loads(args.replace("'", '"'))
    return synthetic_model(args, case["model_sha256"])


def as_list(v):
    return json.loads(v) if isinstance(v, str) else v


@pytest.fixture
def shared():
    return shared_path()


@pytest.fixture(scope="module")
def stories260k():
    """A Llama of stories260K with tok512, shared by a test module."""
    import pyllama
    with pyllama.Llama(shared_path("models/stories260K.bin"),
                       tokenizer=shared_path("models/tok512.bin")) as model:
        yield model
