"""Conversations rendered by tests/test_chat.py and, for its reference, tests/make_chat_reference.py."""
import os
from pathlib import Path

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4."}
U2 = {"role": "user", "content": "And 3 + 3, “twice”? Ünïcode ok."}

# name -> (messages, add_generation_prompt, with tools)
CASES = {
    "user": ([U1], True, False),
    "system-user": ([SYSTEM, U1], True, False),
    "multi-turn": ([U1, A1, U2], True, False),
    "system-multi-turn": ([SYSTEM, U1, A1, U2], True, False),
    "no-generation-prompt": ([SYSTEM, U1, A1], False, False),
    "tools": ([U1], True, True),
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]

# each model's bos_token / eos_token (their tokenizer_config.json)
SPECIAL = {
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>"),
    "google-gemma-2-2b-it": ("<bos>", "<eos>"),
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>"),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>"),
}


def template_dir():
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("PYLLAMA_SHARED") or root.parent / "shared").resolve() / "templates"
