"""Writes tests/data/chat_reference.json: Hugging Face transformers' own rendering of every
template in ../shared/templates for a few conversations (the oracle of tests/test_chat.py).

    pip install transformers   # 5.24.0 made the committed file
    python tests/make_chat_reference.py
"""
import json
import sys
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, str(Path(__file__).parent))
from chat_cases import CASES, SPECIAL, TOOLS, template_dir  # noqa: E402


def main():
    out = {}
    for path in sorted(template_dir().glob("*.jinja")):
        bos, eos = SPECIAL[path.stem]
        for name, (messages, add_gen, with_tools) in CASES.items():
            try:
                rendered, _ = render_jinja_template(
                    conversations=[messages], tools=TOOLS if with_tools else None,
                    chat_template=path.read_text(), add_generation_prompt=add_gen,
                    bos_token=bos, eos_token=eos, date_string="26 Jul 2024")
                out[f"{path.stem}/{name}"] = {"text": rendered[0]}
            except Exception as e:  # a template that refuses the conversation
                out[f"{path.stem}/{name}"] = {"error": str(e)}
    dest = Path(__file__).parent / "data" / "chat_reference.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{dest}: {len(out)} renderings")


if __name__ == "__main__":
    main()
