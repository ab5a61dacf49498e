"""`pyllama info`: what a model file holds, as a dict (for --json) or as text."""
import numpy as np

from .errors import FormatError
from .formats import GGUF_MAGIC, load, open_map

MAX_LIST = 8  # long metadata arrays are summarised past this many items


def _summarise(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        n = len(value)
        items = [_summarise(v) for v in list(value[:MAX_LIST])]
        return items if n <= MAX_LIST else {"length": n, "first": items}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def describe(path):
    try:
        mf = load(path)
    except FormatError as e:
        if bytes(open_map(path)[:4]) != GGUF_MAGIC:
            raise
        return _describe_gguf(path, e)  # well-formed but not runnable: say why, show what it holds
    tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
                "offset": t.offset} for t in mf.tensors.values()]
    total = sum(t["bytes"] for t in tensors)
    params = sum(int(np.prod(t["shape"])) for t in tensors)
    tok = mf.tokenizer
    info = {
        "file": mf.path,
        "format": mf.format,
        "version": mf.version,
        "file_bytes": mf.file_size,
        "architecture": mf.arch,
        "runnable": True,
        "config": {k: (float(v) if isinstance(v, float) else int(v)) for k, v in mf.config.items()},
        "shared_classifier": mf.shared_classifier,
        "tokenizer": None if tok is None else {
            "source": "embedded", "tokens": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "tensors": tensors,
        "total_tensor_bytes": total,
        "parameters": params,
        "types": _type_counts(mf),
        "metadata": {k: _summarise(v) for k, v in mf.metadata.items()},
    }
    return info


def _describe_gguf(path, error):
    """A GGUF file pyllama cannot run (unknown architecture, a vocabulary it refuses, ...): its
    metadata and tensor list from the structural reader, and the reason. Re-raises when even the
    structure is broken."""
    from .formats.gguf import ggml_type_name, read_metadata
    version, meta, infos = read_metadata(path)
    tensors = [{"name": t.name, "type": ggml_type_name(t.type), "shape": list(reversed(t.ne)),
                "bytes": t.nbytes, "offset": t.offset} for t in infos]
    counts = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return {"file": str(path), "format": "gguf", "version": version,
            "file_bytes": int(open_map(path).size),
            "architecture": meta.get("general.architecture"), "runnable": False,
            "error": str(error), "config": {}, "shared_classifier": None, "tokenizer": None,
            "tensors": tensors, "total_tensor_bytes": sum(t["bytes"] for t in tensors),
            "parameters": sum(int(np.prod(t["shape"])) for t in tensors), "types": counts,
            "metadata": {k: _summarise(v) for k, v in meta.items()}}


def _type_counts(mf):
    counts = {}
    for t in mf.tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts


def render_text(info):
    lines = [f"file:         {info['file']}",
             f"format:       {info['format']} (version {info['version']}), {info['file_bytes']:,} bytes",
             f"architecture: {info['architecture']}"]
    if info.get("runnable") is False:
        lines.append(f"runnable:     no ({info['error']})")
    for k, v in info["config"].items():
        lines.append(f"  {k:<12} {v}")
    if info["shared_classifier"] is not None:
        lines.append(f"  {'classifier':<12} {'shared with token_embd' if info['shared_classifier'] else 'separate'}")
    tok = info["tokenizer"]
    lines.append("tokenizer:    " + ("none in the file" if tok is None else
                                     f"{tok['tokens']} tokens (bos {tok['bos_id']}, eos {tok['eos_id']})"))
    if info["metadata"]:
        lines.append("metadata:")
        for k, v in info["metadata"].items():
            if isinstance(v, dict) and "length" in v:
                v = f"[{v['length']} items] {v['first'][:3]} …"
            lines.append(f"  {k} = {v}")
    lines.append(f"tensors: {len(info['tensors'])}, {info['parameters']:,} parameters, "
                 f"{info['total_tensor_bytes']:,} bytes "
                 f"({', '.join(f'{n} {t}' for t, n in info['types'].items())})")
    w = max([len(t["name"]) for t in info["tensors"]] + [4])
    lines.append(f"  {'name':<{w}}  {'type':<5} {'shape':<16} {'bytes':>12}")
    for t in info["tensors"]:
        shape = "x".join(str(d) for d in t["shape"])
        lines.append(f"  {t['name']:<{w}}  {t['type']:<5} {shape:<16} {t['bytes']:>12,}")
    return "\n".join(lines) + "\n"
