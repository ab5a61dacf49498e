"""The public model object: `pyllama.Llama`."""
import os

import numpy as np

from .errors import FormatError, ParameterError, TokenizerError
from .formats import GGUF_MAGIC, ModelFile, load, open_map
from .generate import (encode_prompt, generate_tokens, make_sampler, resolve_steps, stop_rule,
                       stream_text)
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
    threads    OpenMP threads for the C core (default: all cores available to this process)
    n_ctx      positions the KV cache holds (default: the model's seq_len; more on request)
    mmap       map the file (default: loads in milliseconds, pages shared between processes);
               False reads it into memory (safe if the file may change on disk while in use)

    One Llama is used by one thread at a time (calls from another thread wait for it); separate
    Llama objects run in parallel (the GIL is released while C runs).
    """

    def __init__(self, path, tokenizer=None, threads=None, n_ctx=None, mmap=True):
        if isinstance(path, ModelFile):  # already loaded (pyllama.load)
            self.path, self.file = path.path, path
        else:
            self.path = os.fspath(path)
            self.file = load(self.path, mmap=mmap)
        if not self.file.has_weights:
            raise FormatError(f"{self.path}: a vocab-only GGUF holds no weights to run; load its "
                              f"tokenizer with pyllama.load_tokenizer(path)")
        self._model = Transformer(self.file, n_ctx=n_ctx, threads=threads)
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

    # -- properties ------------------------------------------------------------------------------
    @property
    def config(self):
        return dict(self.file.config)

    @property
    def threads(self):
        return self._model.threads

    @threads.setter
    def threads(self, value):
        self._model.threads = value

    @property
    def n_ctx(self):
        return self._model.n_ctx

    def _tok(self):
        if self.tokenizer is None:
            raise TokenizerError(self.tokenizer_problem or f"{self.path}: no tokenizer loaded "
                                 f"(pass tokenizer=PATH to a tokenizer.bin)")
        return self.tokenizer

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text, bos=True, eos=False, special=False):
        """Token ids of `text` (str, or UTF-8 bytes). bos=True adds BOS where the file says so
        (Llama 2 and 3 yes, Qwen2 no; as llama.cpp's add_special); special=True turns control
        token texts such as "<|eot_id|>" into their ids."""
        return self._tok().encode(text, bos=None if bos else False, eos=eos, special=special)

    @property
    def stop_ids(self):
        """Sampled ids that end generation (None: llama2.c's rule, BOS, for .bin files)."""
        return stop_rule(self.file, self.tokenizer)

    def detokenize(self, ids):
        """Text of a sequence of token ids."""
        return self._tok().decode(ids)

    def _check_ids(self, ids):
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)] if len(ids) else []
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ParameterError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids

    def logits(self, ids):
        """Teacher-forced logits: row i is the output after feeding ids[0..i] from position 0."""
        ids = self._check_ids(ids)
        if len(ids) > self.n_ctx:
            raise ParameterError(f"{len(ids)} ids do not fit the context of {self.n_ctx} positions")
        with self._model._lock:
            return self._model.prefill(ids, 0, all_logits=True)

    def generate(self, prompt="", steps=256, temperature=1.0, topp=0.9, seed=None, echo=False):
        """Stream text as it is generated, as llama2.c's `run` does.

        steps counts positions including the prompt's tokens (0 = the model's context); generation
        stops early when BOS is sampled (.bin files, as llama2.c) or at EOS/EOT/EOM (GGUF files). temperature 0 is greedy; seed None or 0 means a seed from
        the clock. Yields the continuation's text pieces (with echo=True, the prompt's first).
        """
        tok = self._tok()
        steps = resolve_steps(steps, self.n_ctx)
        sampler = make_sampler(self._model, temperature, topp, seed)
        ids = encode_prompt(tok, prompt, self.n_ctx, bos=True if self.stop_ids is None else None)
        pairs = generate_tokens(self._model, ids, steps, sampler, bos_id=tok.bos_id,
                                stop_ids=self.stop_ids)
        return stream_text(tok, pairs, skip=0 if echo else len(ids) - 1)

    # -- lifetime --------------------------------------------------------------------------------
    def close(self):
        """Release the model's memory map and buffers; the object is unusable afterwards."""
        self._model = None
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Llama({self.path!r}, format={self.file.format}, dim={self.dim}, "
                f"layers={self.n_layers}, vocab={self.vocab_size})")
