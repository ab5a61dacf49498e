"""pyllama.ray on a local Ray cluster started here (2 CPUs, shared by every test of the module).

Expected texts come from the plain Python API on the same file: Llama.create_completion with
temperature=0 (itself checked against llama2.c / llama.cpp in test_parity / test_completion), so
these tests prove that the Ray path (actors, engine batching, retries) changes nothing.
"""
import os
import socket
import sys

import pytest
import ray
from ray import cloudpickle

import pyllama
import pyllama.ray as pray
from pyllama import ParameterError
from pyllama import Tokenizer

from conftest import shared_path

MAX_TOKENS = 24
WORDS = ["Once upon a time", "The cat", "Lily and Tom", "One day", "A little bird", "The sun",
         "Sam was sad because", "There was a big", "Mom said", "The dog ran"]


def prompts(n):
    return [f"{WORDS[i % len(WORDS)]}{' ' + str(i) if i >= len(WORDS) else ''}" for i in range(n)]


@pytest.fixture(scope="module")
def cluster():
    # pyllama.ray itself must be the package's module, and `ray` the Ray package (absolute imports)
    assert pray.__name__ == "pyllama.ray" and pray.ray is ray and hasattr(ray, "data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files():
    return str(shared_path("models/stories260K.bin")), str(shared_path("models/tok512.bin"))


@pytest.fixture(scope="module")
def reference(files):
    """prompt -> (text, finish_reason) of Llama.create_completion, greedy."""
    out = {}
    with pyllama.Llama(files[0], tokenizer=files[1]) as llama:
        for p in prompts(200):
            c = llama.create_completion(p, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]
            out[p] = (c["text"], c["finish_reason"])
    return out


def dataset(rows):
    return ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(rows)],
                               override_num_blocks=8)


def test_200_prompts_give_the_greedy_texts_of_the_python_api(cluster, files, reference):
    ps = prompts(200)
    ds = dataset(ps)
    out = pray.generate(ds, files[0], tokenizer=files[1], concurrency=2, batch_size=16,
                        max_tokens=MAX_TOKENS, temperature=0).take_all()
    # the order is kept by the result's own context: the caller's are left as they were
    assert not ds.context.execution_options.preserve_order
    assert not ray.data.DataContext.get_current().execution_options.preserve_order
    assert [r["id"] for r in out] == list(range(200))  # every row once, in the input's order
    assert [r["prompt"] for r in out] == ps
    assert [r["error"] for r in out] == [None] * 200
    assert [(r["text"], r["finish_reason"]) for r in out] == [reference[p] for p in ps]
    assert len({r["text"] for r in out}) > 20  # distinct prompts, distinct stories


class CrashOnce(Tokenizer):
    """tok512 whose encode() kills its process (os._exit, no cleanup: as a node or OOM kill would)
    when it meets `marker` while `flag` does not exist yet; it writes its pid into the flag first.
    Reaches the actor through generate(tokenizer=...), the public load option."""

    @classmethod
    def wrap(cls, tok, marker, flag, seen):
        obj = cls.__new__(cls)
        obj.__dict__.update(tok.__dict__)
        obj.marker, obj.flag, obj.seen = marker, str(flag), str(seen)
        return obj

    def encode(self, text, *args, **kwargs):
        if text == self.marker and not os.path.exists(self.flag):
            with open(self.flag, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        ids = super().encode(text, *args, **kwargs)
        if text == self.marker:
            with open(self.seen, "a") as f:
                f.write(f"{os.getpid()}\n")
        return ids


def test_an_actor_killed_mid_batch_has_its_rows_retried(cluster, files, reference, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import tests/
    try:
        ps = prompts(60)
        marker = ps[37]  # in the middle of the third batch of 16
        tok = CrashOnce.wrap(pyllama.load_tokenizer(files[1], 512), marker, tmp_path / "died",
                             tmp_path / "retried")
        out = pray.generate(dataset(ps), files[0], tokenizer=tok, concurrency=1, batch_size=16,
                            max_tokens=MAX_TOKENS, temperature=0).take_all()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    dead = int((tmp_path / "died").read_text())
    retried = [int(x) for x in (tmp_path / "retried").read_text().split()]
    assert len(retried) == 1 and retried[0] != dead  # a new actor process ran the batch again
    assert [r["id"] for r in out] == list(range(60))  # every input row exactly once, in order
    assert [(r["text"], r["finish_reason"], r["error"]) for r in out] == \
        [(*reference[p], None) for p in ps]


def test_a_bad_row_gets_an_error_not_a_failed_job(cluster, files, reference):
    ps = prompts(12)
    # 800+ tokens (the context holds 512), then a null prompt
    rows = ps[:5] + ["Once upon a time " * 200] + ps[5:9] + [None] + ps[9:]
    out = pray.generate(dataset(rows), files[0], tokenizer=files[1], batch_size=4,
                        max_tokens=MAX_TOKENS, temperature=0).take_all()
    assert [r["id"] for r in out] == list(range(len(rows)))
    too_long, null = out[5], out[10]
    assert too_long["text"] is None and too_long["finish_reason"] is None
    assert too_long["error"].startswith("ParameterError: the prompt (") and \
        "the context holds 512" in too_long["error"]
    assert null["prompt"] is None and null["text"] is None and null["finish_reason"] is None
    assert null["error"] == "ParameterError: prompt: expected a string or token ids, found None"
    good = out[:5] + out[6:10] + out[11:]
    assert [(r["prompt"], r["text"], r["finish_reason"], r["error"]) for r in good] == \
        [(p, *reference[p], None) for p in ps]


def test_columns_and_sampling_options_pass_through(cluster, files):
    """output_column names the text column; stop strings and seeds are create_completion's."""
    ps = ["Once upon a time", "The cat"]
    ds = ray.data.from_items([{"q": p} for p in ps])
    out = pray.generate(ds, files[0], tokenizer=files[1], prompt_column="q", output_column="a",
                        max_tokens=40, temperature=0.9, seed=7, stop=["."]).take_all()
    with pyllama.Llama(files[0], tokenizer=files[1]) as llama:
        want = [llama.create_completion(p, max_tokens=40, temperature=0.9, seed=7, stop=["."])
                ["choices"][0] for p in ps]
    assert [(r["q"], r["a"], r["finish_reason"]) for r in out] == \
        [(p, w["text"], w["finish_reason"]) for p, w in zip(ps, want)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature="hot"), "temperature: expected a number"),
    (dict(max_tokens=600), "the context holds 512"),
    (dict(top_k=-1), "top_k"),
    (dict(stop=""), "stop"),
    (dict(logit_bias={9999: 1.0}), "9999"),
    (dict(bogus=1), "unknown argument(s): bogus"),
    (dict(n_ctx=-1), "n_ctx"),
    (dict(slots=0), "slots"),
    (dict(concurrency=0), "concurrency"),
    (dict(concurrency=(2, 1)), "concurrency[1]"),
    (dict(threads_per_actor=1.5), "threads_per_actor"),
    (dict(batch_size=0), "batch_size"),
    (dict(prompt_column="nope"), "no column 'nope'"),
    (dict(output_column="prompt"), "output_column"),
    (dict(output_column="error"), "output_column"),
])
def test_bad_arguments_are_refused_before_any_actor_starts(cluster, files, kwargs, message):
    with pytest.raises(ParameterError) as e:
        pray.generate(dataset(["x"]), files[0], tokenizer=files[1], **kwargs)
    assert message in str(e.value)


def test_a_missing_column_found_only_when_the_pipeline_runs_fails_clearly(cluster, files):
    ds = ray.data.range(3).map(lambda r: {"q": str(r["id"])})  # schema unknown until it runs
    assert ds.schema(fetch_if_missing=False) is None
    with pytest.raises(Exception, match="prompt_column: the dataset has no column 'prompt' \\(its columns: q\\)"):
        pray.generate(ds, files[0], tokenizer=files[1], max_tokens=4).take_all()


def test_a_bad_model_or_dataset_is_refused_up_front(cluster, files, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 10)
    with pytest.raises(pyllama.FormatError):
        pray.generate(dataset(["x"]), str(junk), tokenizer=files[1])
    with pytest.raises(ParameterError, match="dataset: expected a ray.data.Dataset"):
        pray.generate([{"prompt": "x"}], files[0], tokenizer=files[1])


@pytest.fixture(scope="module")
def serve_port(cluster):
    from ray import serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def test_serve_answers_the_openai_client(serve_port, files, reference):
    import openai
    from ray import serve
    serve.run(pray.serve_app(files[0], tokenizer=files[1], parallel=2, model_name="stories"),
              name="pyllama", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["stories"]
    ps = prompts(3)
    for p in ps:
        c = client.completions.create(model="stories", prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        assert (c.choices[0].text, c.choices[0].finish_reason) == reference[p]
    pieces = client.completions.create(model="stories", prompt=ps[0], max_tokens=MAX_TOKENS,
                                       temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in pieces) == reference[ps[0]][0]
    with pytest.raises(openai.BadRequestError, match="the context holds"):
        client.completions.create(model="stories", prompt="Once upon a time " * 200, max_tokens=8)
    serve.delete("pyllama")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_replicas=0), "num_replicas"),
    (dict(num_replicas=2, autoscaling_config={"min_replicas": 1}), "leave it unset"),
    (dict(autoscaling_config=3), "autoscaling_config"),
    (dict(ray_actor_options="x"), "ray_actor_options"),
    (dict(parallel=0), "parallel"),
    (dict(ctx_size=1), "ctx_size"),
    (dict(bogus=1), "bogus"),
])
def test_serve_app_refuses_bad_options_before_deploying(cluster, files, kwargs, message):
    with pytest.raises(ParameterError, match=message):
        pray.serve_app(files[0], tokenizer=files[1], **kwargs)
