"""Chat: the only place messages are rendered into a prompt, and create_chat_completion.

Templates are Jinja2, rendered as Hugging Face's apply_chat_template does: an
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with loopcontrols, a tojson
filter that is json.dumps (no HTML escaping), the globals raise_exception(msg) and
strftime_now(fmt), and the variables messages, add_generation_prompt, bos_token, eos_token (tools
when given, and any extra keyword). Which template: a per-call chat_template, else the Llama's
chat_template= / chat_format=, else the file's `tokenizer.chat_template`, else Llama 2's [INST]
format exactly as llama2.c's chat renders it.

The rendered text goes to the tokenizer with control-token text recognized (special=True): a
tokenizer without that notion (the SentencePiece one) gets the text split at its BOS/EOS texts,
those become their ids and the rest is encoded without BOS (as llama2.c encodes each turn).
"""
import json
from datetime import datetime

from . import validate as V
from .completion import Completion, TextShape, completion_stream, run
from .errors import ParameterError, PyllamaError

# llama2.c's chat(): "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]" on the first turn
# (without the <<SYS>> block when there is no system prompt), "[INST] {user} [/INST]" after;
# every turn starts with BOS, every reply ends with EOS.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('llama-2 chat: roles are system (first), user and assistant') }}"
    "{% endif %}{% endfor %}")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FORMATS = {"llama-2": LLAMA2, "chatml": CHATML}

_env = None
_compiled = {}


def _environment():
    global _env
    if _env is None:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - a broken install
            raise PyllamaError(f"chat templates need Jinja2 (pip install jinja2): {e}") from None

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def raise_exception(message):
            raise _TemplateRaised(message)

        _env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                             extensions=["jinja2.ext.loopcontrols"])
        _env.filters["tojson"] = tojson
        _env.globals["raise_exception"] = raise_exception
        _env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return _env


class _TemplateRaised(Exception):
    pass


def render(template, messages, add_generation_prompt=True, bos_token="", eos_token="", tools=None,
           **extra):
    """The template's text for these messages (errors of any kind: PyllamaError)."""
    import jinja2
    from jinja2.exceptions import SecurityError
    template = V.text(template, "chat_template")
    add_generation_prompt = V.boolean(add_generation_prompt, "add_generation_prompt")
    messages = check_messages(messages)
    try:
        compiled = _compiled.get(template)
        if compiled is None:
            compiled = _compiled[template] = _environment().from_string(template)
        variables = dict(extra, messages=messages, add_generation_prompt=add_generation_prompt,
                         bos_token=bos_token, eos_token=eos_token)
        if tools is not None:
            variables["tools"] = tools
        return compiled.render(**variables)
    except _TemplateRaised as e:
        raise PyllamaError(f"chat template: {e}") from None
    except SecurityError as e:
        raise PyllamaError(f"chat template: blocked by the sandbox (a template may not reach "
                           f"Python internals): {e}") from None
    except jinja2.TemplateError as e:
        raise PyllamaError(f"chat template: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise PyllamaError(f"chat template failed: {type(e).__name__}: {e}") from None


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ParameterError(f"messages: expected a non-empty list of {{'role': ..., 'content': ...}} "
                             f"dicts, found {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ParameterError(f"messages[{i}]: expected a dict with 'role' and 'content', found {m!r:.60}")
        V.text(m.get("role"), f"messages[{i}]['role']")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ParameterError(f"messages[{i}]['content']: expected a string, found {content!r:.60}")
    return [dict(m) for m in messages]


def template_of(llama, chat_template=None):
    """The template text a Llama renders with (see the module docstring for the order)."""
    if chat_template is not None:
        return V.text(chat_template, "chat_template")
    own = getattr(llama, "chat_template", None)
    if own is not None:
        return own
    found = llama.file.metadata.get("tokenizer.chat_template") if llama.file is not None else None
    return found if isinstance(found, str) and found else LLAMA2


def resolve_template(chat_format=None, chat_template=None):
    """The Llama constructor's chat_format= / chat_template= as one template text (or None)."""
    if chat_format is not None and chat_template is not None:
        raise ParameterError("give chat_format or chat_template, not both")
    if chat_format is not None:
        return FORMATS[V.choice(chat_format, "chat_format", tuple(FORMATS))]
    return V.optional(V.text, chat_template, "chat_template")


def token_texts(llama):
    """bos_token, eos_token texts for the template ("" when the tokenizer has none)."""
    tok = llama._tok()
    ids = (getattr(tok, "bos_id", None), getattr(tok, "eos_id", None))
    if hasattr(tok, "token_text"):  # the byte-level BPE tokenizer: "<|begin_of_text|>"
        return tuple(tok.token_text(i) if i is not None and i >= 0 else "" for i in ids)
    # SentencePiece: a llama2.c tokenizer.bin spells them "\n<s>\n", "\n</s>\n"
    names = tok.pieces
    return tuple(names[i].decode("utf-8", "replace").strip() if i is not None and i >= 0 else ""
                 for i in ids)


def apply_chat_template(llama, messages, add_generation_prompt=True, chat_template=None, **extra):
    bos, eos = token_texts(llama)
    return render(template_of(llama, chat_template), messages, add_generation_prompt, bos, eos, **extra)


def encode_chat(llama, text):
    """Token ids of a rendered chat: control-token text becomes its id; no BOS is added."""
    tok = llama._tok()
    if not hasattr(tok, "decode_piece"):  # the tokenizer contract: special=True parses them
        return tok.encode(text, bos=False, special=True)
    bos, eos = token_texts(llama)
    ids, rest = [], text
    while rest:
        cuts = [(rest.find(s), s, i) for s, i in ((bos, tok.bos_id), (eos, tok.eos_id)) if s and s in rest]
        at, s, tid = min(cuts) if cuts else (len(rest), "", None)
        if at:
            ids += tok.encode(rest[:at], bos=False)
        if tid is not None:
            ids.append(tid)
        rest = rest[at + len(s):]
    return ids


class ChatShape(TextShape):
    """A Completion's pieces as OpenAI "chat.completion" objects: stream chunks whose deltas bring
    the role, then the content, then the finish reason; or the whole message with its usage."""
    prefix = "chatcmpl"

    def _lp(self, records):
        return {"content": [{"token": r[1], "logprob": r[2],
                             "top_logprobs": [{"token": t, "logprob": v} for t, v in r[3].items()]}
                            for r in records]} if self.want_lp else None

    def _chunk(self, delta, records, finish):
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": self.index, "delta": delta, "logprobs": self._lp(records), "finish_reason": finish}]}

    def start(self):
        return [self._chunk({"role": "assistant"}, [], None)]

    def chunks(self, piece, records, finish):
        out = [self._chunk({"content": piece}, records, None)] if piece or records or finish is None else []
        return out + ([self._chunk({}, [], finish)] if finish is not None else [])

    def whole(self, pieces):
        texts, records, finish = [], [], None
        for piece, recs, finish in pieces:
            texts.append(piece)
            records += recs
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": self.index, "message": {"role": "assistant", "content": "".join(texts)},
                             "logprobs": self._lp(records), "finish_reason": finish}],
                "usage": self.req.usage}


def chat_request(llama, messages, chat_template=None, tools=None, **kw):
    """The Completion of a chat: the messages rendered with the template, then tokenized."""
    text = apply_chat_template(llama, messages, True, chat_template, tools=tools)
    return Completion(llama, encode_chat(llama, text), **kw)


def create_chat_completion(llama, messages, stream=False, chat_template=None, tools=None, **kw):
    """Llama.create_chat_completion (see there)."""
    stream = V.boolean(stream, "stream")
    req = chat_request(llama, messages, chat_template, tools, **kw)
    shape = ChatShape(llama.path, req)
    pieces = run(llama, req)
    return shape.stream(pieces) if stream else shape.whole(pieces)


class Conversation:
    """A chat kept as messages and as the exact token ids the model has seen (the sampled reply
    tokens, not a re-tokenization of their text), so each turn evaluates only its new part.
    Used by the CLI's chat mode; llama2.c's chat is this with the Llama 2 format."""

    def __init__(self, llama, system=None):
        self.llama = llama
        self.messages = [{"role": "system", "content": V.text(system, "system")}] if system else []
        self.ids, self.text = [], ""  # what the model has seen, and its rendered text

    def prompt(self, user):
        """Add a user message; the ids of the whole conversation with the generation prompt."""
        self.messages.append({"role": "user", "content": V.text(user, "user")})
        text = apply_chat_template(self.llama, self.messages, True)
        if self.text and text.startswith(self.text):
            ids = self.ids + encode_chat(self.llama, text[len(self.text):])
        else:
            ids = encode_chat(self.llama, text)
        self.ids, self.text = ids, text
        return ids

    def reply(self, max_tokens, sampler=None, **kw):
        """Stream the assistant's reply as (text, finish_reason) pieces and remember it."""
        stats, parts = {}, []
        for piece, _, finish in completion_stream(self.llama, self.ids, max_tokens=max_tokens,
                                                  stats=stats, sampler=sampler, **kw):
            parts.append(piece)
            yield piece, finish
        content = "".join(parts)
        self.messages.append({"role": "assistant", "content": content})
        done = apply_chat_template(self.llama, self.messages, False)
        if done.startswith(self.text + content):  # the template's end of turn (e.g. EOS) follows
            self.ids = self.ids + stats["tokens"] + encode_chat(self.llama, done[len(self.text + content):])
        else:
            self.ids = encode_chat(self.llama, done)
        self.text = done


class Llama2cChatSampler:
    """llama2.c's sampler as llama2.c's chat() uses it: chat() samples after every position,
    prompt tokens included, and throws those draws away. So before a turn's first reply token
    the random state advances once per prompt token evaluated but the last (at temperature 0
    nothing is drawn), and the same seed gives llama2.c's same reply."""

    def __init__(self, sampler, llama):
        from ._core import ffi
        self.sampler, self.tf, self.mark = sampler, llama._model, None
        self._dummy = ffi.new("float[]", 2)
        self._scratch = ffi.new("pl_probindex[]", 2)

    def turn(self):
        self.mark = self.tf.n_evaluated
        return self

    def sample(self, logits_ptr, history=()):
        if self.mark is not None:
            from ._core import lib
            s = self.sampler
            for _ in range(self.tf.n_evaluated - self.mark - 1 if s.temperature != 0 else 0):
                lib.pl_sample(self._dummy, 2, s.temperature, s.topp, s._rng, self._scratch)
            self.mark = None
        return self.sampler.sample(logits_ptr)
