"""`pyllama info`: what a model file holds, as a dict (for --json) or as text.

Any well-formed GGUF is described, also one pyllama cannot run (another architecture, a tensor
type the core does not compute with, a tokenizer it does not read, a string that is not UTF-8):
its metadata and tensor list come from the structural reader, and `runnable` is false with the
reason in `cannot_run`. Only a file that is not even structurally sound is an error.

--json writes strict JSON: a non-finite float in the metadata (which JSON cannot hold) is written
as the string "NaN", "Infinity" or "-Infinity". The text form escapes control characters (and
other invisible format characters such as bidi overrides) in every string taken from the file, so
metadata cannot drive the terminal (ANSI escapes) or fake lines.
"""
import json
import math
import os
import unicodedata

import numpy as np

from .errors import FormatError
from .formats import GGUF_MAGIC, load, open_map
from .formats.common import type_name

MAX_LIST = 8  # long metadata arrays are summarised past this many items
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _summarise(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        n = len(value)
        items = [_summarise(v) for v in list(value[:MAX_LIST])]
        return items if n <= MAX_LIST else {"length": n, "first": items}
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else _NON_FINITE.get(value, "NaN")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def describe(path):
    """The description of a model file as a JSON-ready dict (see the module docstring)."""
    path = os.fspath(path)
    mm = open_map(path)
    if bytes(mm[:4]) != GGUF_MAGIC:
        return _runnable(load(path))
    from .formats.gguf import read_gguf, read_metadata
    try:
        return _runnable(read_gguf(path, mm))
    except FormatError as e:
        reason = str(e).removeprefix(f"{path}: ")
    problems = []
    version, meta, infos = read_metadata(path, mm, problems)  # raises if not even well-formed
    tensors = [{"name": t.name, "type": type_name(t.type), "shape": list(reversed(t.ne)),
                "bytes": t.nbytes, "offset": t.offset} for t in infos]
    arch = meta.get("general.architecture")
    return _finish({
        "file": path, "format": "gguf", "version": version, "file_bytes": int(mm.size),
        "architecture": arch if isinstance(arch, str) else None,
        "runnable": False, "cannot_run": reason, "problems": problems, "config": None,
        "shared_classifier": None,
        "tokenizer": _tokenizer_info(meta, path),
        "tensors": tensors,
        "parameters": sum(int(np.prod(t.ne, dtype=object)) for t in infos),
    }, meta)


def _runnable(mf):
    tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
                "offset": t.offset} for t in mf.tensors.values()]
    tok = _tokenizer_info(mf.metadata, mf.path)
    refused = tok.get("error") if tok else None
    return _finish({
        "file": mf.path, "format": mf.format, "version": mf.version, "file_bytes": mf.file_size,
        "architecture": mf.arch, "runnable": mf.has_weights and not refused,
        "cannot_run": refused or (None if mf.has_weights else "no tensors: a vocab-only file (its "
                                  "tokenizer is usable: pyllama.load_tokenizer)"),
        "problems": [],
        "config": {k: (float(v) if isinstance(v, float) else int(v))
                   for k, v in mf.config.items()},
        "shared_classifier": mf.shared_classifier if mf.has_weights else None,
        "tokenizer": tok,
        "tensors": tensors,
        "parameters": sum(int(np.prod(t["shape"])) for t in tensors),
    }, mf.metadata)


def _finish(info, meta):
    counts = {}
    for t in info["tensors"]:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    info["total_tensor_bytes"] = sum(t["bytes"] for t in info["tensors"])
    info["types"] = counts
    info["metadata"] = {k: _summarise(v) for k, v in meta.items()}
    return info


def to_json(info):
    """Strict JSON (non-finite floats were made strings by describe; allow_nan=False proves it)."""
    return json.dumps(info, indent=2, allow_nan=False) + "\n"


def _clean(text):
    """A string from the file, safe for a terminal: control and format characters escaped."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
                       if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def _show(value):
    """A metadata value (as _summarise made it) in one safe line."""
    if isinstance(value, dict) and "length" in value:
        return f"[{value['length']} items] [{', '.join(_show(v) for v in value['first'][:3])}, …]"
    if isinstance(value, list):
        return f"[{', '.join(_show(v) for v in value)}]"
    if isinstance(value, str):
        return repr(value) if len(value) != len(value.strip()) else _clean(value)
    return _clean(value)


def _tokenizer_info(meta, path):
    """The embedded tokenizer: kind (spm, bpe), pre-tokenizer, special ids, add_bos, whether
    a chat template is present; {"error": ...} when its vocabulary is refused."""
    from .tokenizers import from_gguf_metadata
    if "tokenizer.ggml.model" not in meta:
        return None
    try:
        tok = from_gguf_metadata(meta, path)
    except FormatError as e:
        return {"source": "embedded", "model": _summarise(meta["tokenizer.ggml.model"]),
                "error": str(e).removeprefix(f"{path}: ")}
    return {"source": "embedded", "kind": tok.kind, "pre": tok.pre, "tokens": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "eot_id": tok.eot_id,
            "eom_id": tok.eom_id, "stop_ids": sorted(tok.stop_ids), "add_bos": tok.add_bos,
            "chat_template": isinstance(meta.get("tokenizer.chat_template"), str)}


def _tokenizer_line(tok):
    if tok is None:
        return "none in the file"
    if "error" in tok:
        return f"refused: {_clean(tok['error'])}"
    kind = {"spm": "SentencePiece BPE", "bpe": "byte-level BPE"}[tok["kind"]]
    pre = f", pre-tokenizer {_clean(tok['pre'])}" if tok["pre"] else ""
    return (f"{kind}{pre}, {tok['tokens']} tokens (bos {tok['bos_id']}, eos {tok['eos_id']}, "
            f"stop at {', '.join(map(str, tok['stop_ids']))}; add_bos "
            f"{'yes' if tok['add_bos'] else 'no'}; chat template "
            f"{'present' if tok['chat_template'] else 'absent'})")


def render_text(info):
    lines = [f"file:         {_clean(info['file'])}",
             f"format:       {info['format']} (version {info['version']}), "
             f"{info['file_bytes']:,} bytes",
             f"architecture: {_clean(info['architecture'])}"]
    if not info["runnable"]:
        lines.append(f"pyllama cannot run this file: {_clean(info['cannot_run'])}")
        lines += [f"  note: {_clean(p)}" for p in info["problems"]]
    for k, v in (info["config"] or {}).items():
        lines.append(f"  {k:<12} {v}")
    if info["shared_classifier"] is not None:
        lines.append(f"  {'classifier':<12} "
                     f"{'shared with token_embd' if info['shared_classifier'] else 'separate'}")
    lines.append("tokenizer:    " + _tokenizer_line(info["tokenizer"]))
    if info["metadata"]:
        lines.append("metadata:")
        lines += [f"  {_clean(k)} = {_show(v)}" for k, v in info["metadata"].items()]
    lines.append(f"tensors: {len(info['tensors'])}, {info['parameters']:,} parameters, "
                 f"{info['total_tensor_bytes']:,} bytes "
                 f"({', '.join(f'{n} {t}' for t, n in info['types'].items())})")
    names = [_clean(t["name"]) for t in info["tensors"]]
    w = max([len(n) for n in names] + [4])
    lines.append(f"  {'name':<{w}}  {'type':<5} {'shape':<16} {'bytes':>12}")
    for name, t in zip(names, info["tensors"]):
        shape = "x".join(str(d) for d in t["shape"])
        lines.append(f"  {name:<{w}}  {t['type']:<5} {shape:<16} {t['bytes']:>12,}")
    return "\n".join(lines) + "\n"


def run(args, out, err):
    """The `pyllama info` command: text, or strict JSON with --json."""
    info = describe(args.file)
    out.write((to_json(info) if args.json else render_text(info)).encode())
    return 0
