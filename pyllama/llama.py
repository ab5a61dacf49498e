"""The public model object: `pyllama.Llama`."""
import os

from . import validate
from .errors import FormatError, ParameterError, PyllamaError, TokenizerError
from .formats import GGUF_MAGIC, ModelFile, load, open_map
from .generate import (check_prompt_length, encode_prompt, generate_tokens, make_sampler,
                       resolve_steps, stop_rule, stream_text)
from .model import Transformer
from .tokenizers import BaseTokenizer, Tokenizer, from_gguf_metadata

CONFIG_ATTRS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def find_tokenizer(model_path):
    """llama2.c's default: tokenizer.bin beside the model, then in the working directory."""
    for candidate in (os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer.bin"),
                      "tokenizer.bin"):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_tokenizer(path, vocab_size=None):
    """A tokenizer from a GGUF file (its embedded vocabulary, whatever the architecture; vocab-only
    files too) or from a llama2.c tokenizer.bin (which does not store its size: give the model's
    vocab_size)."""
    path = os.fspath(path)
    mm = open_map(path)
    if bytes(mm[:4]) == GGUF_MAGIC:
        from .formats.gguf import read_metadata
        return from_gguf_metadata(read_metadata(path, mm)[1], source=path)
    if vocab_size is None:
        raise TokenizerError(f"{path}: a llama2.c tokenizer.bin does not store its size; "
                             f"pass the model's vocab_size")
    return Tokenizer.from_llama2c(path, vocab_size)


class Llama:
    """A loaded model: forward pass, tokenizer and sampler.

    path       a llama2.c .bin (legacy, V1, V2) or a GGUF file (or what pyllama.load returned)
    tokenizer  a tokenizer.bin or GGUF path, a Tokenizer, or None: the file's own tokenizer
               (GGUF), else tokenizer.bin beside the model or in the working directory, else none
               (logits-only use; tokenize() then raises TokenizerError)
    threads    OpenMP threads for the C core (default: all cores available to this process; 1 for
               a model too small to gain from more, see model.default_threads)
    n_ctx      positions the KV cache holds (default: the model's seq_len, at most 4096; 0: all of
               the model's seq_len; more on request)
    mmap       map the file (default: pages shared between processes); False reads it into
               memory (safe if the file may change on disk while in use)
    repack     copy the weight matrices at load into the layouts the kernels read fastest
               (default: float matrices into 2 MiB pages; with AVX-512 VNNI, Q4_0, Q5_0, Q8_0,
               Q4_K and Q6_K rows interleaved by 16, with AVX2 alone Q4_0, Q5_0 and Q8_0;
               README "Speed"), within half the memory
               available; False runs every matrix from the file as it is: less memory, a
               quicker load, pages shared with other processes, slower tokens
    chat_format / chat_template   the chat template to use instead of the file's: a format name
               ("llama-2", "chatml") or a Jinja template text

    One Llama is used by one thread at a time (calls from another thread wait for it); separate
    Llama objects run in parallel (the GIL is released while C runs). After close() every method
    raises PyllamaError. A Llama cannot be pickled: give another process the path instead.
    """

    def __init__(self, path, tokenizer=None, threads=None, n_ctx=None, mmap=True, chat_format=None,
                 chat_template=None, repack=True):
        from .chat import resolve_template
        self._model = None
        mmap = validate.boolean(mmap, "mmap")
        self.repack = validate.boolean(repack, "repack")
        if not (tokenizer is None or isinstance(tokenizer, (Tokenizer, str, bytes, os.PathLike))):
            raise ParameterError(f"tokenizer: expected a path, a Tokenizer or None, found "
                                 f"{type(tokenizer).__name__}")
        self.chat_template = resolve_template(chat_format, chat_template)
        if isinstance(path, ModelFile):  # already loaded (pyllama.load)
            self.path, self.file = path.path, path
        elif isinstance(path, (str, bytes, os.PathLike)):
            self.path = os.fspath(path)
            self.file = load(self.path, mmap=mmap)
        else:
            raise ParameterError(f"path: expected a file path or a pyllama.load() result, found "
                                 f"{type(path).__name__}")
        if not self.file.has_weights:
            raise FormatError(f"{self.path}: a vocab-only GGUF holds no weights to run; load its "
                              f"tokenizer with pyllama.load_tokenizer(path)")
        self._model = Transformer(self.file, n_ctx=n_ctx, threads=threads, repack=self.repack)
        self.tokenizer_problem = None  # why no tokenizer was found, when one was refused
        self.tokenizer = self._resolve_tokenizer(tokenizer)
        for key in CONFIG_ATTRS:
            setattr(self, key, self.file.config[key])

    def _resolve_tokenizer(self, tokenizer):
        if isinstance(tokenizer, BaseTokenizer):
            tok = tokenizer
        elif tokenizer is not None:
            tok = load_tokenizer(tokenizer, self.file.config["vocab_size"])
        elif "tokenizer.ggml.model" in self.file.metadata:
            tok = from_gguf_metadata(self.file.metadata, source=self.path)
        else:
            found = find_tokenizer(self.path)
            try:
                tok = load_tokenizer(found, self.file.config["vocab_size"]) if found else None
            except (FormatError, TokenizerError) as e:
                # a tokenizer.bin that happens to lie beside the model but does not fit it (another
                # vocabulary size) is not used: logits work, text calls raise this
                self.tokenizer_problem = (f"{e} (found beside the model: pass the model's own "
                                          f"tokenizer with tokenizer=PATH or -z PATH)")
                tok = None
        if tok is not None and tok.vocab_size != self.file.config["vocab_size"]:
            raise TokenizerError(f"the tokenizer has {tok.vocab_size} tokens, the model's "
                                 f"vocabulary {self.file.config['vocab_size']}: they do not belong "
                                 f"together")
        return tok

    def _live(self):
        """The Transformer, or PyllamaError once the model is closed."""
        if self._model is None:
            raise PyllamaError(f"{self.path}: the model is closed")
        return self._model

    # -- properties ------------------------------------------------------------------------------
    @property
    def config(self):
        self._live()
        return dict(self.file.config)

    @property
    def threads(self):
        return self._live().threads

    @threads.setter
    def threads(self, value):
        self._live().threads = value

    @property
    def n_ctx(self):
        return self._live().n_ctx

    def _tok(self):
        self._live()
        if self.tokenizer is None:
            raise TokenizerError(self.tokenizer_problem or f"{self.path}: no tokenizer loaded "
                                 f"(pass tokenizer=PATH to a tokenizer.bin)")
        return self.tokenizer

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text, bos=True, eos=False, special=False):
        """Token ids of `text` (str, or UTF-8 bytes). bos=True adds BOS where the file says so
        (Llama 2 and 3 yes, Qwen2 no; as llama.cpp's add_special); special=True turns control
        token texts such as "<|eot_id|>" into their ids."""
        tok = self._tok()
        bos = validate.boolean(bos, "bos")
        return tok.encode(text, bos=None if bos else False, eos=validate.boolean(eos, "eos"),
                          special=validate.boolean(special, "special"))

    @property
    def stop_ids(self):
        """Sampled ids that end generation (None: llama2.c's rule, BOS, for .bin files)."""
        return stop_rule(self.file, self.tokenizer)

    def detokenize(self, ids):
        """Text of a sequence of token ids (a list of ints or a 1-D integer array)."""
        tok = self._tok()
        return tok.decode(validate.token_ids(ids, self.vocab_size))

    def logits(self, ids, last_only=False):
        """Teacher-forced logits: row i is the output after feeding ids[0..i] from position 0
        ([len(ids), vocab] float32). last_only=True returns the last row alone ([vocab]), without
        computing the classifier for the other positions (a prompt's prefill)."""
        model = self._live()
        ids = validate.token_ids(ids, self.vocab_size, allow_empty=not last_only)
        last_only = validate.boolean(last_only, "last_only")
        if len(ids) > model.n_ctx:
            raise ParameterError(f"{len(ids)} ids do not fit the context of {model.n_ctx} positions")
        with model._lock:
            if last_only:
                model.prefill(ids, 0)
                return model.logits_buffer[0].copy()
            return model.prefill(ids, 0, all_logits=True)

    def generate(self, prompt="", steps=256, temperature=1.0, topp=0.9, seed=None, echo=False):
        """Stream text as it is generated, as llama2.c's `run` does.

        steps counts positions including the prompt's tokens (0 = the model's context); generation
        stops early when BOS is sampled (.bin files, as llama2.c) or at EOS/EOT/EOM (GGUF files).
        temperature 0 is greedy; seed None or 0 means fresh random bits for every call (an int
        reproduces a run: the same as `pyllama run -s SEED`). Yields the continuation's text
        pieces (with echo=True, the prompt's first).
        """
        echo = validate.boolean(echo, "echo")
        tok = self._tok()
        ids = encode_prompt(tok, prompt, self.n_ctx, bos=True if self.stop_ids is None else None)
        pairs = self.generate_tokens(ids, steps, temperature, topp, seed)
        return stream_text(tok, pairs, skip=0 if echo else len(ids) - 1)

    def generate_tokens(self, prompt, steps=256, temperature=1.0, topp=0.9, seed=None, stop=True):
        """The token ids of a generation as (previous id, id) pairs, in llama2.c's order: the
        prompt's pairs first, then the sampled ones (what `generate` decodes).

        prompt is text (encoded with BOS) or token ids (BOS included if wanted); the positions
        that run, min(len(prompt), steps), must fit n_ctx. stop=False never ends early (steps
        positions always run); otherwise BOS ends a .bin file's run, the tokenizer's stop_ids
        (EOS, EOT, EOM) a GGUF file's. The other arguments are those of generate()."""
        model = self._live()
        steps = resolve_steps(steps, model.n_ctx)
        sampler = make_sampler(model, temperature, topp, seed)
        stop = validate.boolean(stop, "stop")
        if isinstance(prompt, (str, bytes, bytearray)):
            ids = encode_prompt(self._tok(), prompt, model.n_ctx,
                                bos=True if self.stop_ids is None else None)
        else:
            ids = validate.token_ids(prompt, self.vocab_size, name="prompt", allow_empty=False)
            check_prompt_length(min(len(ids), steps), model.n_ctx)
        bos = (self.tokenizer.bos_id if self.tokenizer is not None else 1) if stop else None
        return generate_tokens(model, ids, steps, sampler, bos_id=bos,
                               stop_ids=self.stop_ids if stop else None)

    # -- completions, chat, state (pyllama/completion.py, chat.py, kvcache.py) ----------------------
    def create_completion(self, prompt, max_tokens=16, temperature=0.8, top_p=0.95, top_k=40,
                          min_p=0.05, typical_p=1.0, repeat_penalty=1.0, repeat_last_n=64,
                          frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None, stop=None,
                          stop_token_ids=None, seed=None, logprobs=None, echo=False, stream=False,
                          context_shift=False, n_keep=1):
        """An OpenAI/llama-cpp-python-shaped text completion of `prompt` (str or token ids).

        Sampling runs llama.cpp's chain: repeat/frequency/presence penalties over the last
        repeat_last_n tokens (-1: all), logit_bias {id: bias}, top_k (0: off), typical_p, top_p,
        min_p, temperature (0 = greedy); seed None draws a fresh seed. Generation ends at
        max_tokens (None: the context's end; finish_reason "length"), at the tokenizer's stop ids
        or stop_token_ids, or before a `stop` string (finish_reason "stop"). logprobs=N adds the
        log-probabilities (log-softmax of the raw logits) of each token and its N best
        alternatives. echo=True puts the prompt in front. stream=True returns an iterator of
        chunks. The KV cache is reused for the longest shared prefix with the previous call.
        prompt + max_tokens beyond n_ctx is an error, unless context_shift=True: then the oldest
        positions after the first n_keep are dropped as the context fills.
        """
        kw = dict(locals())
        del kw["self"]
        from .completion import create_completion
        return create_completion(self, **kw)

    __call__ = create_completion

    def create_chat_completion(self, messages, max_tokens=None, temperature=0.8, top_p=0.95, top_k=40,
                               min_p=0.05, typical_p=1.0, repeat_penalty=1.0, repeat_last_n=64,
                               frequency_penalty=0.0, presence_penalty=0.0, logit_bias=None,
                               stop=None, stop_token_ids=None, seed=None, logprobs=None,
                               stream=False, context_shift=False, n_keep=1, chat_template=None,
                               tools=None):
        """An OpenAI-shaped chat completion ("chat.completion"; with stream=True an iterator of
        "chat.completion.chunk" whose deltas bring the role, then the content). The messages
        are rendered with the chat template (see apply_chat_template); the other arguments are
        create_completion's (max_tokens None: up to the end of the context)."""
        kw = dict(locals())
        del kw["self"]
        from .chat import create_chat_completion
        return create_chat_completion(self, **kw)

    def apply_chat_template(self, messages, add_generation_prompt=True, chat_template=None, **variables):
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]): the given
        template, else the Llama's chat_format/chat_template, else the file's
        tokenizer.chat_template, else Llama 2's [INST] format (llama2.c's chat). Rendered as
        Hugging Face does (a Jinja2 sandbox); extra keywords become template variables."""
        from .chat import apply_chat_template
        self._live()
        return apply_chat_template(self, messages, add_generation_prompt, chat_template, **variables)

    def reset(self):
        """Forget what the KV cache holds (the next call evaluates its whole prompt)."""
        with self._live()._lock:
            self._model.tokens.clear()

    def save_state(self):
        """The KV cache's used positions and their token ids, as bytes (for load_state)."""
        from .kvcache import save
        with self._live()._lock:
            return save(self._model)

    def load_state(self, state):
        """Restore a save_state() of this same model (another model's or a too large state is a
        PyllamaError)."""
        from .kvcache import load
        with self._live()._lock:
            load(self._model, state)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self):
        """Drop the model's memory map and buffers (freed once no unfinished generator still runs
        on them); every method raises PyllamaError afterwards. Closing twice is harmless."""
        self._model = None
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        self._live()
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        raise PyllamaError(f"{self.path}: a Llama cannot be pickled (it holds a memory map and C "
                           f"buffers); pass the path to the other process and load it there")

    def __repr__(self):
        state = "closed" if self._model is None else \
            f"format={self.file.format}, dim={self.dim}, layers={self.n_layers}, vocab={self.vocab_size}"
        return f"Llama({self.path!r}, {state})"
