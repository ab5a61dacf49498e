"""Past one machine: pyllama on a Ray cluster (pip install 'pyllama[ray]').

    import ray, pyllama.ray
    ray.init()                                    # or address="auto" / RAY_ADDRESS: an existing cluster
    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    out = pyllama.ray.generate(ds, "/shared/model.gguf", concurrency=4, max_tokens=64, temperature=0)
    out.take_all()                                # rows: prompt, text, finish_reason, error

    serve.run(pyllama.ray.serve_app("/shared/model.gguf", num_replicas=2))   # pyllama serve, on Ray

generate() runs Dataset.map_batches over a pool of actors. Each actor memory-maps the model once
and feeds every batch to a continuous-batching Engine (pyllama.engine): the rows of a batch are
decoded together, so each weight row read from memory serves all of them. Per row, the request is
a completion.Completion - create_completion's own sampler chain, stop ids and strings - so a row's
text is what Llama.create_completion gives for that prompt. A row that cannot run (a prompt longer
than the context, a prompt that is not text) gets its message in the `error` column and None as
text; the job goes on. An actor that dies is restarted by Ray and its batch retried; the output
keeps the input's rows in their order, each once.

Every node must be able to read the model path (shared storage, or the same file copied to each)
and import pyllama. This module is pyllama.ray; `import ray` below is the Ray package (absolute).
"""
import ray

from . import validate as V
from .errors import ParameterError, PyllamaError

__all__ = ["generate", "serve_app", "Generator"]

LOAD_OPTIONS = ("tokenizer", "threads", "n_ctx", "mmap", "chat_format", "chat_template", "repack")
ENGINE_OPTIONS = ("slots", "step_tokens")
RESULT_COLUMNS = ("finish_reason", "error")


def _split(options):
    load = {k: options.pop(k) for k in LOAD_OPTIONS if k in options}
    engine = {k: options.pop(k) for k in ENGINE_OPTIONS if k in options}
    return load, engine, options  # the rest: create_completion's arguments


def _request(llama, prompt, n_ctx, sampling):
    from .completion import Completion
    if prompt is None or isinstance(prompt, bytes):  # a null cell; bytes are not text
        raise ParameterError(f"prompt: expected a string or token ids, found {prompt!r:.40}")
    return Completion(llama, prompt, n_ctx=n_ctx, **sampling)


def _open(model, load):
    """The Llama for text (tokenizer, templates; a one-position cache: the engine runs the model)
    and the context each row runs in (n_ctx: pyllama.model.context_size)."""
    from .llama import Llama
    from .model import context_size
    llama = Llama(model, **dict(load, n_ctx=1))
    return llama, context_size(load.get("n_ctx"), llama.config["seq_len"])


def _check(model, load, engine, sampling):
    """Everything an actor would refuse, refused here before any actor starts: the model file and
    its load options (memory-mapped: no weights are read, no context-sized cache is allocated),
    the engine options, and the sampling arguments (a Completion of a one-token prompt in the
    actors' context runs every check of create_completion)."""
    for key in ENGINE_OPTIONS:
        V.optional(V.integer, engine.get(key), key, 1)
    llama, n_ctx = _open(model, load)
    with llama:
        _request(llama, [0], n_ctx, sampling)


class Generator:
    """The actor behind generate(): one Llama and one Engine per actor, kept for every batch."""

    def __init__(self, model, load, engine, sampling, prompt_column, output_column):
        from .engine import Engine
        self.llama, n_ctx = _open(model, load)
        self.engine = Engine(self.llama, n_ctx=n_ctx, threads=load.get("threads"), **engine)
        self.sampling, self.prompt_column, self.output_column = sampling, prompt_column, output_column

    def __call__(self, batch):
        if self.prompt_column not in batch:  # a schema generate() could not know in advance
            raise ParameterError(f"prompt_column: the dataset has no column {self.prompt_column!r} "
                                 f"(its columns: {', '.join(batch)})")
        prompts = batch[self.prompt_column]
        reqs, handles, errors = [], [], []
        for prompt in prompts:  # submit every row first: the engine decodes them together
            req = handle = error = None
            try:
                req = _request(self.llama, prompt, self.engine.n_ctx, self.sampling)
                if req.max_tokens == 0:
                    req.finish("length")
                else:
                    handle = self.engine.submit(req.ids, req)
            except PyllamaError as e:
                error = f"{type(e).__name__}: {e}"
            reqs.append(req), handles.append(handle), errors.append(error)
        texts, reasons = [], []
        for i, (req, handle) in enumerate(zip(reqs, handles)):
            if handle is not None:
                try:
                    handle.result()
                except PyllamaError as e:
                    errors[i] = f"{type(e).__name__}: {e}"
                req.finish(handle.finish_reason)  # flushes the text of a request the engine ended
            ok = req is not None and errors[i] is None
            texts.append("".join(p[0] for p in req.take()) if ok else None)
            reasons.append(req.finish_reason if ok else None)
        return {**batch, self.output_column: texts, "finish_reason": reasons, "error": errors}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def generate(dataset, model, *, prompt_column="prompt", output_column="text", concurrency=1,
             threads_per_actor=1, batch_size=16, **options):
    """Generate a completion for every row of a Ray Dataset; returns the Dataset with the columns
    output_column (the text), finish_reason and error added, rows in the input's order.

    model              a model path every node can read
    prompt_column      the column with the prompts (text, or lists of token ids)
    concurrency        actors (each loads the model once); an int, or (min, max) to autoscale
    threads_per_actor  CPUs Ray reserves for each actor and the C core's threads in it
    batch_size         rows handed to an actor at a time (decoded together, `slots` at once)
    options            load options (tokenizer, n_ctx, threads, chat_format...), engine options
                       (slots: sequences decoded together, default min(batch_size, 8); step_tokens),
                       and create_completion's arguments (max_tokens, temperature, stop, seed...)
    All of them are checked here, before any actor starts (ParameterError / FormatError).
    """
    if not isinstance(dataset, ray.data.Dataset):
        raise ParameterError(f"dataset: expected a ray.data.Dataset, found {type(dataset).__name__}")
    prompt_column = V.text(prompt_column, "prompt_column")
    output_column = V.text(output_column, "output_column")
    if output_column == prompt_column or output_column in RESULT_COLUMNS:
        raise ParameterError(f"output_column: {output_column!r} would overwrite the prompt or the "
                             f"{' / '.join(RESULT_COLUMNS)} column")
    if isinstance(concurrency, tuple) and len(concurrency) == 2:
        lo = V.integer(concurrency[0], "concurrency[0]", 1)
        pool = ray.data.ActorPoolStrategy(min_size=lo, max_size=V.integer(concurrency[1], "concurrency[1]", lo))
    else:
        pool = ray.data.ActorPoolStrategy(size=V.integer(concurrency, "concurrency", 1))
    threads_per_actor = V.integer(threads_per_actor, "threads_per_actor", 1)
    batch_size = V.integer(batch_size, "batch_size", 1)
    load, engine, sampling = _split(dict(options))
    load.setdefault("threads", threads_per_actor)
    engine.setdefault("slots", min(batch_size, 8))
    engine["max_queue"] = batch_size  # a whole batch is submitted at once
    _check(model, load, engine, sampling)
    schema = dataset.schema(fetch_if_missing=False)  # known without running the input pipeline
    if schema is not None and prompt_column not in schema.names:
        raise ParameterError(f"prompt_column: the dataset has no column {prompt_column!r} "
                             f"(its columns: {', '.join(schema.names)})")
    out = dataset.map_batches(
        Generator, fn_constructor_args=(model, load, engine, sampling, prompt_column, output_column),
        batch_size=batch_size, batch_format="numpy", compute=pool, num_cpus=threads_per_actor)
    # (Ray Data restarts a pool's dead actors and retries their batches: max_restarts and
    # max_task_retries default to -1 for actor pools.)
    # Only this result's own execution keeps the input's order (the input dataset's context and
    # the driver's DataContext are left as they were).
    out = ray.data.Dataset.copy(out, _deep_copy=True)
    out.context.execution_options.preserve_order = True
    return out


def serve_app(model, num_replicas=None, autoscaling_config=None, ray_actor_options=None,
              name="pyllama", **server_options):
    """The OpenAI-compatible app of `pyllama serve` as a Ray Serve application, for
    serve.run(serve_app(...)). Each replica builds pyllama.server.build_app(model, **server_options)
    (its own Llama and engine) and answers /v1/completions, /v1/chat/completions, /v1/models...

    model               a model path every node can read
    num_replicas        replicas (default 1); leave it None when autoscaling_config is given
    autoscaling_config  Ray Serve's autoscaling settings (min_replicas, max_replicas, ...), passed on
    ray_actor_options   Ray options of each replica (default: num_cpus = threads, else 1)
    server_options      build_app's: parallel, ctx_size, threads, tokenizer, api_key, ...
    Everything is checked here, before any replica starts: the app is built once with a
    two-position context (no context-sized cache) and closed again.
    """
    from ray import serve
    from .server import build_app
    name = V.text(name, "name")
    num_replicas = V.optional(V.integer, num_replicas, "num_replicas", 1)
    if autoscaling_config is not None:
        if num_replicas is not None:
            raise ParameterError("num_replicas: leave it unset when autoscaling_config is given "
                                 "(its min_replicas / max_replicas say how many)")
        if not isinstance(autoscaling_config, dict):
            raise ParameterError(f"autoscaling_config: expected a dict, found {autoscaling_config!r}")
    elif num_replicas is None:
        num_replicas = 1
    if ray_actor_options is None:
        ray_actor_options = {"num_cpus": server_options.get("threads") or 1}
    elif not isinstance(ray_actor_options, dict):
        raise ParameterError(f"ray_actor_options: expected a dict, found {ray_actor_options!r}")
    V.optional(V.integer, server_options.get("ctx_size"), "ctx_size", 2)
    build_app(model, **dict(server_options, ctx_size=2)).state.server.close()

    def build():  # in each replica (serve.ingress calls a builder function there)
        from pyllama.server import build_app
        return build_app(model, **server_options)

    deployment = serve.deployment(serve.ingress(build)(), name=name, num_replicas=num_replicas,
                                  autoscaling_config=autoscaling_config,
                                  ray_actor_options=ray_actor_options)
    return deployment.bind()
