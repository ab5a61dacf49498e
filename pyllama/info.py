"""`pyllama info`: what a model file holds, as a dict (for --json) or as text."""
import numpy as np

from .formats import load

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
    mf = load(path)
    tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
                "offset": t.offset} for t in mf.tensors.values()]
    total = sum(t["bytes"] for t in tensors)
    params = sum(int(np.prod(t["shape"])) for t in tensors)
    info = {
        "file": mf.path,
        "format": mf.format,
        "version": mf.version,
        "file_bytes": mf.file_size,
        "architecture": "llama",
        "config": {k: (float(v) if isinstance(v, float) else int(v)) for k, v in mf.config.items()},
        "shared_classifier": mf.shared_classifier,
        "tokenizer": _tokenizer_info(mf),
        "tensors": tensors,
        "total_tensor_bytes": total,
        "parameters": params,
        "types": _type_counts(mf),
        "metadata": {k: _summarise(v) for k, v in mf.metadata.items()},
    }
    return info


def _tokenizer_info(mf):
    """The embedded tokenizer: kind (spm, bpe), pre-tokenizer, special ids, add_bos, whether
    a chat template is present; {"error": ...} when its vocabulary is refused."""
    from .errors import FormatError
    from .tokenizers import from_gguf_metadata
    if "tokenizer.ggml.model" not in mf.metadata:
        return None
    try:
        tok = from_gguf_metadata(mf.metadata, mf.path)
    except FormatError as e:
        return {"source": "embedded", "error": str(e)}
    return {"source": "embedded", "kind": tok.kind, "pre": tok.pre, "tokens": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "eot_id": tok.eot_id,
            "eom_id": tok.eom_id, "stop_ids": sorted(tok.stop_ids), "add_bos": tok.add_bos,
            "chat_template": isinstance(mf.metadata.get("tokenizer.chat_template"), str)}


def _tokenizer_line(tok):
    if tok is None:
        return "none in the file"
    if "error" in tok:
        return f"refused: {tok['error']}"
    kind = {"spm": "SentencePiece BPE", "bpe": "byte-level BPE"}[tok["kind"]]
    pre = f", pre-tokenizer {tok['pre']}" if tok["pre"] else ""
    return (f"{kind}{pre}, {tok['tokens']} tokens (bos {tok['bos_id']}, eos {tok['eos_id']}, "
            f"stop at {', '.join(map(str, tok['stop_ids']))}; add_bos "
            f"{'yes' if tok['add_bos'] else 'no'}; chat template "
            f"{'present' if tok['chat_template'] else 'absent'})")


def _type_counts(mf):
    counts = {}
    for t in mf.tensors.values():
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts


def render_text(info):
    lines = [f"file:         {info['file']}",
             f"format:       {info['format']} (version {info['version']}), {info['file_bytes']:,} bytes",
             f"architecture: {info['architecture']}"]
    for k, v in info["config"].items():
        lines.append(f"  {k:<12} {v}")
    lines.append(f"  {'classifier':<12} {'shared with token_embd' if info['shared_classifier'] else 'separate'}")
    lines.append("tokenizer:    " + _tokenizer_line(info["tokenizer"]))
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
