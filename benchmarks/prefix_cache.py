"""The prefix cache's speed-up: time to first token of a chat's second turn after a long history,
with the history in the KV cache (warm) versus from nothing (cold, after reset()).

Both runs go through create_chat_completion (render the template, tokenize, evaluate, sample one
token), so the figure is what an API user sees. The issue asks for >= 10x after ~1,000 tokens.

    python benchmarks/prefix_cache.py MODEL [--tokenizer PATH] [--history 1000] [--repeat 5]
"""
import argparse
import statistics
import time

import pyllama

SENTENCES = ("Once upon a time there was a little girl named Lily who loved to play in the park. ",
             "One day she found a shiny red ball under a big green tree near the pond. ",
             "She showed it to her friend Tom, and they played together until the sun went down. ")


def history(m, n_tokens):
    """User/assistant turns, ending with a user message, whose rendering holds ~n_tokens tokens."""
    messages, i = [], 0
    while len(m.tokenize(m.apply_chat_template(messages or [{"role": "user", "content": ""}]))) < n_tokens:
        messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant",
                         "content": SENTENCES[i % 3] + SENTENCES[(i + 1) % 3]})
        i += 1
    return messages if messages[-1]["role"] == "user" else messages + [{"role": "user", "content": "Go on."}]


def prefix_cache_speedup(model, tokenizer=None, history_tokens=1000, repeat=5, threads=None):
    """{history_tokens, new_tokens, cold_s, warm_s, speedup}: median times to the first token of
    a chat's next turn, cold (empty cache) and warm (the conversation so far cached, as a chat
    client gets it: the previous turn's prompt and the reply the model gave, sent back)."""
    with pyllama.Llama(model, tokenizer=tokenizer, threads=threads,
                       n_ctx=max(2048, history_tokens + 256)) as m:
        past = history(m, history_tokens)
        reply = m.create_chat_completion(past, max_tokens=32, temperature=0)["choices"][0]["message"]
        turn = past + [reply, {"role": "user", "content": "And what happened the next day?"}]
        cold, warm = [], []
        for _ in range(repeat):
            m.reset()
            t = time.perf_counter()
            r = m.create_chat_completion(turn, max_tokens=1, temperature=0)
            cold.append(time.perf_counter() - t)
            m.reset()
            m.create_chat_completion(past, max_tokens=32, temperature=0)  # turn 1
            before = m._model.n_evaluated
            t = time.perf_counter()
            m.create_chat_completion(turn, max_tokens=1, temperature=0)  # turn 2
            warm.append(time.perf_counter() - t)
            new = m._model.n_evaluated - before
        c, w = statistics.median(cold), statistics.median(warm)
        return {"history_tokens": r["usage"]["prompt_tokens"], "new_tokens": new, "cold_s": c,
                "warm_s": w, "speedup": c / w}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokenizer")
    ap.add_argument("--history", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    r = prefix_cache_speedup(a.model, a.tokenizer, a.history, a.repeat, a.threads)
    print(f"second chat turn after {r['history_tokens']} tokens: time to first token cold "
          f"{r['cold_s'] * 1e3:.1f} ms, with the prefix cache {r['warm_s'] * 1e3:.1f} ms "
          f"({r['new_tokens']} tokens evaluated): {r['speedup']:.1f}x")


if __name__ == "__main__":
    main()
