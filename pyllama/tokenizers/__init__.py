"""Tokenizers: SentencePiece BPE (spm.py, llama2.c parity) and byte-level BPE (bpe.py), one
contract (see base.py). ``from_gguf_metadata`` chooses by ``tokenizer.ggml.model``.

    from_gguf_metadata(meta, source) -> Tokenizer | BPETokenizer
"""
from ..errors import FormatError
from .base import BaseTokenizer, IncrementalDecoder
from .bpe import PRE_TOKENIZERS, BPETokenizer
from .spm import Tokenizer

# tokenizer.ggml.model -> class
MODELS = {"llama": Tokenizer, "gpt2": BPETokenizer}

__all__ = ["BaseTokenizer", "BPETokenizer", "IncrementalDecoder", "MODELS", "PRE_TOKENIZERS",
           "Tokenizer", "from_gguf_metadata"]


def from_gguf_metadata(meta: dict, source: str = "<gguf>"):
    """The tokenizer a GGUF file's ``tokenizer.ggml.*`` metadata describes."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise FormatError(f"{source}: this GGUF file has no tokenizer (tokenizer.ggml.model)")
    if not isinstance(model, str) or model not in MODELS:
        raise FormatError(f"{source}: unsupported tokenizer model {model!r:.40} (tokenizer.ggml."
                          f"model): supported are {', '.join(repr(m) for m in MODELS)}")
    return MODELS[model].from_gguf_metadata(meta, source)
