"""The README's "Completions, chat and state" section runs as shown: each python block is run in
turn (one namespace, ../shared replaced by the shared folder in use) and its output compared with
the text block that follows it. Expected values: the README itself (written from these runs; the
values they show are checked independently in test_completion.py and test_chat.py)."""
import contextlib
import io
import re

from conftest import ROOT, shared_path


def blocks():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Completions, chat and state", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```\n```text\n(.*?)```", section, re.S)


def test_readme_examples_run_as_shown():
    shared = str(shared_path())
    found = blocks()
    assert len(found) == 6
    namespace = {}
    for code, want in found:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code.replace("../shared", shared), namespace)
        assert out.getvalue() == want, code
