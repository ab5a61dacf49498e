"""Several sequences in one forward pass (pl_forward_batch) and the continuous-batching engine.

Expected values come from pyllama itself: each sequence run alone through the single-sequence
path (Transformer.forward / generate_tokens, whose parity with llama2.c and llama.cpp
tests/test_parity.py and test_gguf_parity.py prove). Models: ../shared/models (quant-base-* are
one synthetic model as llama.cpp and llama2.c quantized it; stories260K is llama2.c's).
"""
import asyncio

import numpy as np
import pytest

from conftest import shared_path

import pyllama
from pyllama import engine as engine_mod
from pyllama.engine import Engine, GreedyPolicy
from pyllama.errors import BusyError, ParameterError, PyllamaError
from pyllama.generate import generate_tokens
from pyllama.model import Transformer
from pyllama.sampler import Sampler

QUANT = ["quant-base-q8_0.gguf", "quant-base-q4_0.gguf", "quant-base-q4_k_m.gguf",
         "quant-base-q6_k.gguf", "quant-base-v2.bin"]
FLOAT = ["quant-base-f32.gguf", "quant-base-f16.gguf", "stories260K.bin"]
N_CTX = 64


def load(name):
    return pyllama.load(shared_path("models/" + name))


def sequences(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=n - 1).tolist() for n in lengths]


def alone(mf, seq, threads):
    """Logits of every position of seq, run by itself token by token in a fresh Transformer."""
    t = Transformer(mf, n_ctx=N_CTX, threads=threads)
    return np.array([t.forward(tok, pos).copy() for pos, tok in enumerate(seq)])


def mixed(mf, seqs, threads):
    """The same sequences through 3 slots: slot 0 takes seqs[0] 7 tokens a step (a prompt chunked
    in) while slots 1 and 2 take one token a step (decoding); when seqs[1] ends, its slot is
    emptied and reused for seqs[3]. Returns each sequence's logits rows."""
    t = Transformer(mf, n_ctx=N_CTX, threads=threads, n_slots=3)
    plan = {0: [0], 1: [1, 3], 2: [2]}  # slot -> its sequences, in turn
    done = [0] * len(seqs)
    got = [[] for _ in seqs]
    while any(plan.values()):
        tokens, slots, owners = [], [], []
        for slot, queue in plan.items():
            if queue:
                i = queue[0]
                chunk = seqs[i][done[i]:done[i] + (7 if slot == 0 else 1)]
                tokens += chunk
                slots += [slot] * len(chunk)
                owners += [i] * len(chunk)
                done[i] += len(chunk)
        out = t.forward_batch(tokens, slots, [True] * len(tokens))
        assert out.shape == (len(tokens), mf.config["vocab_size"])
        for row, i in zip(out, owners):
            got[i].append(row.copy())
        for slot, queue in plan.items():
            if queue and done[queue[0]] == len(seqs[queue[0]]):
                queue.pop(0)
                t.truncate(slot, 0)
    assert t.slot_len == [0, 0, 0]
    return [np.array(g) for g in got]


# grouped-query attention; q, k, v biases with NEOX RoPE (each kv head's keys stored after its
# rotation, run.c)
BPE = ["bpe/llama3-tiny-f16.gguf", "bpe/qwen2-tiny-f16.gguf"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("model", QUANT + FLOAT + BPE)
def test_mixed_batch_equals_each_sequence_alone(model, threads):
    mf = load(model)
    seqs = sequences(mf.config["vocab_size"], (40, 6, 21, 13))
    got = mixed(mf, seqs, threads)
    for g, seq in zip(got, seqs):
        ref = alone(mf, seq, threads)
        assert g.shape == ref.shape
        if model in QUANT:
            assert np.array_equal(g, ref)  # the batch kernels keep the single-token order
        else:
            assert np.abs(g - ref).max() <= 1e-5 * np.abs(ref).max()


def test_reused_slot_gives_the_logits_of_a_fresh_one():
    mf = load("quant-base-q8_0.gguf")
    a, b = sequences(512, (30, 12), seed=5)
    t = Transformer(mf, n_ctx=N_CTX, threads=1, n_slots=2)
    t.forward_batch(a, [1] * len(a), [False] * len(a))
    t.truncate(1, 0)
    reused = t.forward_batch(b, [1] * len(b), [True] * len(b)).copy()
    fresh = Transformer(mf, n_ctx=N_CTX, threads=1, n_slots=2).forward_batch(b, [1] * len(b), [True] * len(b))
    assert np.array_equal(reused, fresh)


@pytest.mark.parametrize("model", ["quant-base-f32.gguf", "quant-base-q4_k_m.gguf"])
def test_one_run_through_forward_batch_is_the_single_sequence_path(model):
    """A batch of one slot at consecutive positions is pl_forward's case: bit-identical, F32 too."""
    mf = load(model)
    seq = sequences(512, (25,), seed=3)[0]
    t = Transformer(mf, n_ctx=N_CTX, threads=2)
    ref = np.concatenate([t.prefill(seq[:10], 0, all_logits=True), t.prefill(seq[10:], 10, all_logits=True)])
    b = Transformer(mf, n_ctx=N_CTX, threads=2, n_slots=2)
    got = np.concatenate([b.forward_batch(seq[:10], [0] * 10, [True] * 10).copy(),
                          b.forward_batch(seq[10:], [0] * 15, [True] * 15).copy()])
    assert np.array_equal(got, ref)


def test_only_wanted_logits_come_back_in_batch_order():
    mf = load("quant-base-q8_0.gguf")
    a, b = sequences(512, (5, 4), seed=7)
    t = Transformer(mf, n_ctx=N_CTX, threads=1, n_slots=2)
    out = t.forward_batch(a + b, [0] * 5 + [1] * 4, [False] * 4 + [True] + [False] * 3 + [True])
    assert out.shape == (2, 512)
    assert np.array_equal(out[0], alone(mf, a, 1)[-1])
    assert np.array_equal(out[1], alone(mf, b, 1)[-1])
    assert t.forward_batch([5], [0], [False]).shape == (0, 512)
    assert t.slot_len == [6, 4]


def test_batches_are_validated_before_c():
    mf = load("quant-base-q8_0.gguf")
    t = Transformer(mf, n_ctx=8, threads=1, n_slots=2)
    nb = t.max_batch
    with pytest.raises(ParameterError, match="slots\\[1\\]"):
        t.forward_batch([1, 2], [0, 2], [True, True])
    with pytest.raises(ParameterError, match="slots\\[0\\]"):
        t.forward_batch([1], [-1], [True])
    with pytest.raises(ParameterError, match="vocabulary"):
        t.forward_batch([1, 512], [0, 1], [True, True])
    with pytest.raises(ParameterError, match="1 slots"):
        t.forward_batch([1, 2], [0], [True, True])
    with pytest.raises(ParameterError, match="found 0 tokens"):
        t.forward_batch([], [], [])
    with pytest.raises(ParameterError, match=f"1..{nb} tokens"):
        t.forward_batch([1] * (nb + 1), [0] * (nb + 1), [False] * (nb + 1))
    with pytest.raises(ParameterError, match="slots\\[0\\]"):
        t.forward_batch([1], [True], [True])
    t.forward_batch([1] * 8, [0] * 8, [False] * 8)
    with pytest.raises(ParameterError, match="slot 0 is full"):
        t.forward_batch([1], [0], [True])
    with pytest.raises(ParameterError, match="slot 1 is full"):
        t.forward_batch([1] * 9, [1] * 9, [False] * 9)
    assert t.slot_len == [8, 0]  # a refused batch changes nothing
    with pytest.raises(ParameterError, match="positions"):
        t.truncate(1, 1)
    with pytest.raises(ParameterError, match="slots"):
        Transformer(mf, n_ctx=8, n_slots=0)
    t.truncate(0, 3)
    t.forward_batch([4], [0], [True])
    assert t.slot_len == [4, 0]


# -- the engine -----------------------------------------------------------------------------------

def greedy_alone(mf, prompt, k):
    """k greedy tokens after prompt through the single-sequence path (generate_tokens)."""
    t = Transformer(mf, n_ctx=N_CTX, threads=1)
    sampler = Sampler(mf.config["vocab_size"], 0.0, 0.9, 1)
    pairs = list(generate_tokens(t, prompt, len(prompt) + k - 1, sampler, bos_id=None))
    return [tok for _, tok in pairs[len(prompt) - 1:]]


@pytest.mark.parametrize("model", ["quant-base-q4_k_m.gguf", "stories260K.bin"])
def test_concurrent_requests_give_the_tokens_of_each_alone(model):
    mf = load(model)
    prompts = sequences(512, (3, 30, 11, 50, 5, 9, 2), seed=11)
    with Engine(mf, slots=3, n_ctx=N_CTX, threads=2, step_tokens=16) as e:
        handles = [e.submit(p, GreedyPolicy(max_tokens=12)) for p in prompts]
        outs = [h.result(timeout=120) for h in handles]
        assert all(h.finish_reason == "length" for h in handles)
        st = e.stats()
    assert st["slots_in_use"] == 0 and st["waiting"] == 0
    assert st["generated"] == 12 * len(prompts)
    for p, out in zip(prompts, outs):
        assert out == greedy_alone(mf, p, 12)


def test_iterating_a_handle_streams_its_tokens():
    mf = load("quant-base-q8_0.gguf")
    p = sequences(512, (6,), seed=2)[0]
    with Engine(mf, slots=2, n_ctx=N_CTX, threads=1) as e:
        h = e.submit(p, GreedyPolicy(max_tokens=5))
        assert list(h) == greedy_alone(mf, p, 5) == h.tokens


def test_async_clients():
    mf = load("quant-base-q8_0.gguf")
    prompts = sequences(512, (4, 9, 17), seed=4)

    async def main(e):
        async def one(p):
            h = e.submit_async(p, GreedyPolicy(max_tokens=6))
            with pytest.raises(PyllamaError, match="async for"):
                next(iter(h))
            return [t async for t in h]
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 120)

    with Engine(mf, slots=2, n_ctx=N_CTX, threads=1) as e:
        outs = asyncio.run(main(e))
    assert outs == [greedy_alone(mf, p, 6) for p in prompts]


def test_updates_bring_every_token_since_the_last_await_and_one_wake_up_per_step(monkeypatch):
    """A loop's handles get their step's tokens in one call_soon_threadsafe (engine._post); a
    client that awaits late gets all tokens delivered since its last await at once."""
    mf = load("quant-base-q8_0.gguf")
    prompts = sequences(512, (4, 9, 6), seed=5)
    posts = []
    real_post = engine_mod._post
    monkeypatch.setattr(engine_mod, "_post", lambda loop, items: (posts.append(len(items)), real_post(loop, items)))

    async def main(e):
        hs = [e.submit_async(p, GreedyPolicy(max_tokens=5)) for p in prompts]
        for _ in range(3):  # 3 steps: the prompts, then 2 tokens each, before anyone awaits
            e.step()
        await asyncio.sleep(0)
        first = [await h.updates() for h in hs]
        while e.step():
            pass
        rest = [await h.updates() for h in hs]
        with pytest.raises(PyllamaError, match="without an event loop"):
            await e.submit(prompts[0]).updates()
        return hs, first, rest

    with Engine(mf, slots=3, n_ctx=N_CTX, threads=1, start=False) as e:
        hs, first, rest = asyncio.run(main(e))
    assert posts == [3, 3, 3, 3, 6]  # one post a step: 3 streams' tokens (the last with their ends)
    for p, h, (tokens, ended), (tokens2, ended2) in zip(prompts, hs, first, rest):
        assert tokens == greedy_alone(mf, p, 3) and not ended
        assert tokens + tokens2 == greedy_alone(mf, p, 5) == h.tokens and ended2
        assert h.finish_reason == "length"


def test_stop_ids_and_a_full_context_end_a_request():
    mf = load("quant-base-q8_0.gguf")
    p = sequences(512, (8,), seed=2)[0]
    ref = greedy_alone(mf, p, 6)
    with Engine(mf, slots=1, n_ctx=N_CTX, start=False) as e:
        h = e.submit(p, GreedyPolicy(max_tokens=50, stop_ids={ref[3]}))
        while e.step():
            pass
        assert h.result(timeout=0) == ref[:ref.index(ref[3]) + 1] and h.finish_reason == "stop"
        long = sequences(512, (N_CTX - 3,), seed=2)[0]
        h = e.submit(long, GreedyPolicy(max_tokens=50))
        while e.step():
            pass
        assert len(h.result(timeout=0)) == 4 and h.finish_reason == "length"  # positions 61..63


def test_cancel_frees_the_slot_within_one_step():
    mf = load("quant-base-q8_0.gguf")
    a, b = sequences(512, (5, 7), seed=3)
    with Engine(mf, slots=2, n_ctx=N_CTX, start=False) as e:
        ha = e.submit(a, GreedyPolicy(max_tokens=40))
        hb = e.submit(b, GreedyPolicy(max_tokens=40))
        e.step()
        e.step()
        assert e.stats()["slots_in_use"] == 2
        ha.cancel()
        e.step()
        assert e.stats()["slots_in_use"] == 1
        assert ha.result(timeout=0) == ha.tokens and ha.finish_reason == "cancelled"
        n = len(ha.tokens)
        e.step()
        assert len(ha.tokens) == n  # nothing more for a cancelled request
        hb.cancel()
        assert e.step() is False and e.stats()["slots_in_use"] == 0
        assert hb.finish_reason == "cancelled"


def test_a_cancelled_waiting_request_never_runs():
    mf = load("quant-base-q8_0.gguf")
    a, b = sequences(512, (5, 7), seed=3)
    with Engine(mf, slots=1, n_ctx=N_CTX, start=False) as e:
        ha, hb = e.submit(a, GreedyPolicy(max_tokens=3)), e.submit(b)
        e.step()
        hb.cancel()
        while e.step():
            pass
        assert hb.result(timeout=0) == [] and hb.finish_reason == "cancelled"
        assert len(ha.result(timeout=0)) == 3


def test_a_full_queue_refuses_with_busy_error():
    mf = load("quant-base-q8_0.gguf")
    p = sequences(512, (5,), seed=3)[0]
    with Engine(mf, slots=2, n_ctx=N_CTX, max_queue=3, start=False) as e:
        handles = [e.submit(p) for _ in range(5)]  # 2 for the slots, 3 waiting
        with pytest.raises(BusyError, match="retry later"):
            e.submit(p)
        assert isinstance(BusyError("x"), PyllamaError)
        e.step()
        assert e.stats()["waiting"] == 3  # still full: the slots are busy
        with pytest.raises(BusyError):
            e.submit(p)
        while e.step():
            pass
        assert all(h.finish_reason == "length" for h in handles)
        assert e.stats()["slots_in_use"] == 0
        e.submit(p)  # room again


def test_prefix_reuse_evaluates_only_the_new_tokens():
    mf = load("quant-base-q8_0.gguf")
    shared, extra = sequences(512, (30, 8), seed=9)
    with Engine(mf, slots=2, n_ctx=N_CTX, start=False) as e:
        first = e.submit(shared, GreedyPolicy(max_tokens=4))
        while e.step():
            pass
        before = e.stats()["prompt_tokens"]
        prompt = shared + first.result(timeout=0)[:3] + extra
        h = e.submit(prompt, GreedyPolicy(max_tokens=10))
        while e.step():
            pass
        st = e.stats()
    assert st["reused_tokens"] == len(shared) + 3  # the slot held shared + 3 fed tokens
    assert st["prompt_tokens"] - before == len(extra)
    assert h.result(timeout=0) == greedy_alone(mf, prompt, 10)


def test_a_long_prompt_does_not_stall_running_streams():
    mf = load("quant-base-q8_0.gguf")
    a, long = sequences(512, (4, 60), seed=6)
    with Engine(mf, slots=2, n_ctx=N_CTX, step_tokens=8, start=False) as e:
        ha = e.submit(a, GreedyPolicy(max_tokens=20))
        e.step()
        assert len(ha.tokens) == 1
        hl = e.submit(long, GreedyPolicy(max_tokens=2))
        for k in range(2, 10):  # the long prompt comes in 7 tokens a step beside a's token
            e.step()
            assert len(ha.tokens) == k
        assert hl.tokens == [] and e.stats()["prompt_tokens"] == 4 + 7 * 8
        while e.step():
            pass
    assert ha.result(timeout=0) == greedy_alone(mf, a, 20)
    assert hl.result(timeout=0) == greedy_alone(mf, long, 2)


def test_a_failing_policy_ends_only_its_request():
    class Broken(GreedyPolicy):
        def choose(self, logits):
            raise RuntimeError("boom")

    class OutOfVocab(GreedyPolicy):
        def choose(self, logits):
            return 10**6

    mf = load("quant-base-q8_0.gguf")
    p = sequences(512, (5,), seed=3)[0]
    with Engine(mf, slots=3, n_ctx=N_CTX, threads=1) as e:
        bad, oov, good = e.submit(p, Broken()), e.submit(p, OutOfVocab()), e.submit(p, GreedyPolicy(max_tokens=3))
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=60)
        with pytest.raises(ParameterError, match="policy's token"):
            oov.result(timeout=60)
        assert good.result(timeout=60) == greedy_alone(mf, p, 3)
        assert bad.finish_reason == oov.finish_reason == "error"


def test_steps_on_fewer_threads_give_the_same_tokens(monkeypatch):
    """adapt_threads (pyllama/threadtune.py) picks each step's threads up to the maximum; with
    quantized weights the tokens are those of a fixed team (each output row is one thread's)."""
    mf = load("quant-base-q8_0.gguf")
    prompts = sequences(512, (3, 9, 5, 7), seed=12)
    outs, used = {}, {}
    for adapt in (False, True):
        with Engine(mf, slots=3, n_ctx=N_CTX, threads=2, start=False, adapt_threads=adapt) as e:
            assert e.max_threads == 2 and (e._tuner is not None) == adapt
            if adapt:  # make 1 thread look fast so that both choices run
                monkeypatch.setattr(e._tuner, "done", lambda key, s, cpu=None, done=e._tuner.done:
                                    done(key, 1.0 if e.model.threads == 1 else 2.0))
            handles = [e.submit(p, GreedyPolicy(max_tokens=20)) for p in prompts]
            seen = set()
            while e.step():
                seen.add(e.stats()["threads"])
            outs[adapt], used[adapt] = [h.result(timeout=0) for h in handles], seen
    assert outs[True] == outs[False] and used == {False: {2}, True: {1, 2}}
    with pytest.raises(ParameterError, match="adapt_threads"):
        Engine(mf, start=False, adapt_threads="yes")
    assert Engine(mf, threads=1, start=False)._tuner is None


def test_engine_arguments_are_checked():
    mf = load("quant-base-q8_0.gguf")
    with pytest.raises(ParameterError, match="slots"):
        Engine(mf, slots=0, start=False)
    with pytest.raises(ParameterError, match="max_queue"):
        Engine(mf, max_queue=-1, start=False)
    with pytest.raises(ParameterError, match="step_tokens"):
        Engine(mf, slots=4, step_tokens=2, start=False)
    llama = pyllama.Llama(shared_path("models/quant-base-q8_0.gguf"), n_ctx=16)
    e = Engine(llama, slots=2, start=False)
    assert e.n_ctx == 16
    llama.close()
    with pytest.raises(ParameterError, match="no weights"):
        Engine(llama, start=False)
    assert Engine(str(shared_path("models/stories260K.bin")), slots=1, start=False).n_ctx == 512
    with pytest.raises(ParameterError, match="prompt"):
        e.submit([])
    with pytest.raises(ParameterError, match="vocabulary"):
        e.submit([1, 512])
    with pytest.raises(ParameterError, match="no room"):
        e.submit([1] * 16)
    with pytest.raises(ParameterError, match="policy"):
        e.submit([1], policy=object())
    with pytest.raises(ParameterError, match="max_tokens"):
        GreedyPolicy(max_tokens=0)
    h = e.submit([1, 5])
    e.close()
    assert h.result(timeout=0) == [] and h.finish_reason == "cancelled"
    with pytest.raises(PyllamaError, match="closed"):
        e.submit([1])


def test_result_after_iterating_and_a_timeout():
    mf = load("quant-base-q8_0.gguf")
    p = sequences(512, (6,), seed=2)[0]
    with Engine(mf, slots=1, n_ctx=N_CTX, start=False) as e:
        h = e.submit(p, GreedyPolicy(max_tokens=3))
        with pytest.raises(TimeoutError, match="did not finish"):
            h.result(timeout=0)  # no step has run
        while e.step():
            pass
        assert list(h) == h.result(timeout=0) == greedy_alone(mf, p, 3)


def test_a_closed_client_loop_cancels_its_request():
    mf = load("quant-base-q8_0.gguf")
    p = sequences(512, (6,), seed=2)[0]
    with Engine(mf, slots=2, n_ctx=N_CTX, start=False) as e:
        loop = asyncio.new_event_loop()
        h = e.submit(p, GreedyPolicy(max_tokens=30), loop=loop)
        other = e.submit(p, GreedyPolicy(max_tokens=3))
        loop.close()
        e.step()  # delivering to the closed loop fails: the request is cancelled, not the engine
        assert h._cancelled
        while e.step():
            pass
        assert h.finish_reason == "cancelled" and other.result(timeout=0) == greedy_alone(mf, p, 3)
        assert e.stats()["slots_in_use"] == 0


def test_clients_in_several_threads():
    import threading
    mf = load("quant-base-q8_0.gguf")
    prompts = sequences(512, (4, 9, 17, 3, 12, 6), seed=12)
    outs = [None] * len(prompts)
    with Engine(mf, slots=3, n_ctx=N_CTX, threads=1) as e:
        def client(i):
            outs[i] = list(e.submit(prompts[i], GreedyPolicy(max_tokens=5)))
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert e.stats()["slots_in_use"] == 0
    assert outs == [greedy_alone(mf, p, 5) for p in prompts]
