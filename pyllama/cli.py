"""The `pyllama` command: `run` (llama2.c's flags), `chat`, `info`, `bench`, `convert`, `serve`.

Every error a user can cause ends as one line `pyllama: error: …` on stderr and exit status 1.
"""
import argparse
import io
import os
import re
import sys
import time

from ._version import __version__
from .errors import PyllamaError

COMMANDS = ("run", "chat", "info", "bench", "convert", "serve")


# a value "--" after a flag, hidden from argparse (which drops "--" even from FLAG=--)
_DASHES = "\0--"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        message = message.replace(repr(_DASHES)[1:-1], "--").replace(_DASHES, "--")
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _UsageError(Exception):
    pass


def _add_run_args(p):
    p.add_argument("checkpoint", help="model file: llama2.c .bin (legacy, V1, V2) or GGUF")
    p.add_argument("-t", "--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature, 0 = greedy argmax (default 1.0)")
    p.add_argument("-p", "--topp", type=float, default=0.9, metavar="P",
                   help="top-p (nucleus) sampling in [0,1]; 0 or 1 = off (default 0.9)")
    p.add_argument("-s", "--seed", default="0", metavar="S",
                   help="random seed, read as llama2.c reads it (C atoi: a 32-bit int, wrapping); "
                        "0 = from the clock (default)")
    p.add_argument("-n", "--steps", type=int, default=256, metavar="N",
                   help="positions to run, prompt included; 0 = the model's context (default 256)")
    p.add_argument("-i", "--input", "--prompt", dest="prompt", default=None, metavar="TEXT",
                   help="input prompt")
    p.add_argument("-z", "--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.bin (default: the GGUF's own, else tokenizer.bin beside the "
                        "model, then in the working directory)")
    p.add_argument("-m", "--mode", choices=("generate", "chat"), default="generate",
                   help="generate (default) or chat")
    p.add_argument("-y", "--system", default=None, metavar="TEXT",
                   help="system prompt in chat mode")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: all available cores; 1 for models too small to gain from more)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="KV cache positions (default: the model's seq_len)")
    _repack_flag(p)


def _repack_flag(p):
    p.add_argument("--no-repack", dest="repack", action="store_false",
                   help="run every matrix from the file as it is (no load-time copies into the "
                        "kernels' layouts: less memory, quicker load, slower tokens)")


def _thread_list(text):
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts like 1,2, found {text!r}") from None


def get_parser():
    """The argparse parser (also used by `make man`)."""
    parser = _Parser(prog="pyllama", description="Llama-2-family inference: llama2.c checkpoints "
                     "and GGUF files, on the CPU, from Python.")
    parser.add_argument("--version", action="version", version=_version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="generate text (llama2.c's run)",
                         description="Generate text from a prompt, or chat (-m chat), with "
                         "llama2.c's options and semantics: same seed, same text.")
    _add_run_args(run)
    chat = sub.add_parser("chat", help="interactive Llama-2 chat (= run -m chat)")
    _add_run_args(chat)
    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("file", help="model file (.bin or .gguf)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    bench = sub.add_parser("bench", help="measure prompt and generation speed",
                           description="Prompt-processing and generation tokens/s (min/median/max "
                           "over repeats), bytes read per token and the share of this machine's "
                           "memory read bandwidth that it reaches.")
    bench.add_argument("model", help="model file")
    bench.add_argument("-z", "--tokenizer", default=None, metavar="PATH", help="tokenizer (unused by the timing)")
    bench.add_argument("--threads", type=_thread_list, default=None, metavar="N[,N…]",
                       help="thread counts (default: all cores)")
    bench.add_argument("--prompt", type=int, default=128, metavar="N", help="prompt tokens (default 128)")
    bench.add_argument("--gen", type=int, default=256, metavar="N", help="generated tokens (default 256)")
    bench.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per figure (default 3)")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    from . import convert
    convert.add_arguments(sub.add_parser(
        "convert", help="convert a model to GGUF (f32, f16, bf16, q8_0, q4_0, q4_k_m, q6_k)",
        description="Write any model pyllama reads as a GGUF file, optionally quantized "
                    "(llama.cpp's type choices per tensor)."))
    _add_serve_args(sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs pyllama[server])",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics, "
                    "batching concurrent requests into one forward pass per step."))
    return parser


def _add_serve_args(p):
    p.add_argument("model", help="model file (.bin or .gguf)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, metavar="N", help="TCP port (default 8080)")
    p.add_argument("--parallel", "-np", type=int, default=4, metavar="N",
                   help="requests generated together, one KV slot each (default 4)")
    p.add_argument("--ctx-size", "-c", type=int, default=None, metavar="N",
                   help="positions per slot (default: the model's context, at most 4096; 0 = all of it)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--api-key", default=os.environ.get("PYLLAMA_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $PYLLAMA_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait for a slot; beyond that 503 (default 64)")
    p.add_argument("-z", "--tokenizer", default=None, metavar="PATH", help="tokenizer (as for run)")
    p.add_argument("--chat-template", default=None, metavar="FORMAT|FILE",
                   help="chat template: llama-2, chatml or a Jinja file (default: the model's own)")
    _repack_flag(p)


def cmd_serve(args, out, err):
    from . import validate
    from .chat import FORMATS
    from .formats.common import MAX_SEQ
    from .server import serve
    validate.optional(validate.integer, args.threads, "--threads", lo=1)
    validate.integer(args.parallel, "--parallel", lo=1)
    if args.ctx_size != 0:  # 0: the model's whole context (pyllama.model.context_size)
        validate.optional(validate.integer, args.ctx_size, "--ctx-size (0 = the model's context)",
                          lo=2, hi=MAX_SEQ)
    validate.integer(args.max_queue, "--max-queue", lo=0)
    template = args.chat_template
    if template is not None:
        if template in FORMATS:
            template = FORMATS[template]
        else:
            try:
                with open(template, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise PyllamaError(f"--chat-template: {template}: not a format name "
                                   f"({', '.join(FORMATS)}) nor a readable UTF-8 file ({e})") from None
    serve(args.model, host=args.host, port=args.port, parallel=args.parallel, ctx_size=args.ctx_size,
          threads=args.threads, api_key=args.api_key, max_queue=args.max_queue,
          tokenizer=args.tokenizer, chat_template=template, repack=args.repack)
    return 0


def _version_string():
    try:
        from . import build_info
        return f"pyllama {__version__} ({build_info()})"
    except Exception as e:  # the core failed to import: still say what we are
        return f"pyllama {__version__} (core not loaded: {e})"


def _check_args(args):
    from . import validate
    validate.optional(validate.integer, args.threads, "--threads", lo=1)
    validate.integer(args.steps, "--steps", lo=0)
    validate.optional(validate.integer, args.context, "--context", lo=1)


_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def atoi(text):
    """C's atoi as glibc computes it, (int) strtol(text, NULL, 10): leading white space, a sign,
    decimal digits, anything after them ignored, no digits = 0; a value beyond a 64-bit long is
    clamped to it, then truncated to a 32-bit int (wrapping: 2147483648 gives -2147483648)."""
    m = _ATOI.match(text)
    if not m:
        return 0
    v = max(-(1 << 63), min(int(m.group(1)), (1 << 63) - 1)) & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def llama2c_seed(text):
    """The rng seed llama2.c's run uses for `-s TEXT`: atoi(TEXT) as an unsigned long long (a
    negative int wraps to 2^64 - x); 0 means (unsigned int) time(NULL)."""
    seed = atoi(text) % (1 << 64)
    return seed if seed else int(time.time()) & 0xFFFFFFFF


def _argv_text(text, what="--prompt"):
    """A command-line string checked to be UTF-8 (argv that is not reaches Python as surrogate
    escapes, which no tokenizer can encode)."""
    if text is None:
        return None
    from .errors import TokenizerError
    raw = os.fsencode(text)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{what} is not valid UTF-8: byte {e.start} is 0x{raw[e.start]:02x}") from None


def cmd_run(args, out, err):
    from .generate import encode_prompt, resolve_steps
    from .sampler import Sampler
    from .llama import Llama
    from .errors import TokenizerError
    from .formats import load
    _check_args(args)
    seed = llama2c_seed(args.seed)
    mf = load(args.checkpoint)
    # the KV cache holds the positions this run can reach (steps), not always the model's seq_len
    limit = args.context or mf.config.get("seq_len", 1)
    steps = resolve_steps(args.steps, limit)
    chat = args.mode == "chat" or args.command == "chat"
    # chat: the last reply token of the budget needs no position of its own, but a completion
    # checks prompt + max_tokens against the context
    model = Llama(mf, tokenizer=args.tokenizer, threads=args.threads, repack=args.repack,
                  n_ctx=max(args.context or steps, steps + 1) if chat else args.context or steps)
    if model.tokenizer is None:
        raise TokenizerError(model.tokenizer_problem or f"no tokenizer: {args.checkpoint} has "
                             f"none and no tokenizer.bin was found beside it or in the working "
                             f"directory (use -z PATH)")
    if chat:
        sampler = Sampler(model.vocab_size, args.temperature, args.topp, seed)
        return _chat(model, sampler, _argv_text(args.prompt), _argv_text(args.system, "--system"), steps,
                     out)
    tok = model.tokenizer
    # BOS always for .bin files (llama2.c, stop_ids None); where the file says for GGUF files
    ids = encode_prompt(tok, _argv_text(args.prompt) or "", limit,
                        bos=True if model.stop_ids is None else None)
    start, n = None, 0
    if model.stop_ids is not None and ids:  # GGUF: the first prompt token may be text (no BOS)
        out.write(tok.safe_piece(None, ids[0]))
    for prev, token in model.generate_tokens(ids, steps, args.temperature, args.topp, seed):
        out.write(tok.safe_piece(prev, token))
        out.flush()
        n += 1
        if start is None:
            start = time.monotonic()
    out.write(b"\n")
    out.flush()
    if n > 1 and start is not None:
        elapsed = max(time.monotonic() - start, 1e-9)
        err.write(f"achieved tok/s: {(n - 1) / elapsed:f}\n")
    return 0


def _read_line(out, guide):
    """A line typed in chat, checked to be UTF-8 as -i and -y are; None at the end of input."""
    from .errors import TokenizerError
    out.write(guide.encode())
    out.flush()
    line = (sys.stdin.buffer if sys.stdin is not None else io.BytesIO()).readline()
    if not line:
        return None
    raw = line.rstrip(b"\n")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"chat input is not valid UTF-8: byte {e.start} is "
                             f"0x{raw[e.start]:02x}") from None


def _chat(model, sampler, user_prompt, system_prompt, steps, out):
    """llama2.c's chat(): turns from stdin until EOF or `steps` positions. The messages are
    rendered and the replies generated by pyllama/chat.py (the model's chat template, else
    llama2.c's [INST] format), with llama2.c's sampler."""
    from .chat import Conversation, Llama2cChatSampler
    system = system_prompt if system_prompt is not None else \
        _read_line(out, "Enter system prompt (optional): ")
    if system is not None:
        conv, chat_sampler, user = Conversation(model, system), Llama2cChatSampler(sampler, model), user_prompt
        while len(conv.ids) < steps:
            if user is None:
                user = _read_line(out, "User: ")
            if user is None:
                break
            ids = conv.prompt(user)
            user = None
            out.write(b"Assistant: ")
            if len(ids) > steps:  # the budget ends inside the prompt
                break
            for piece, finish in conv.reply(steps - len(ids) + 1, sampler=chat_sampler.turn()):
                out.write(piece.encode())
                out.flush()
            if finish != "stop":
                break
            out.write(b"\n")
    out.write(b"\n")
    out.flush()
    return 0


def cmd_info(args, out, err):
    from .info import run
    return run(args, out, err)


def cmd_bench(args, out, err):
    from .bench import run
    from . import validate
    for name in ("prompt", "gen", "repeat"):
        validate.integer(getattr(args, name), f"--{name}", lo=1)
    return run(args, out, err)


def cmd_convert(args, out, err):
    from .convert import run
    return run(args, out, err)


def _value_after_flag(argv):
    """llama2.c takes the word after a flag as its value whatever it looks like (`-i "-dash"`);
    argparse would read "-dash" as an option: join such pairs as FLAG=VALUE for `run`/`chat`."""
    if not argv or argv[0] not in ("run", "chat"):
        return argv
    parser = _Parser(add_help=False)
    _add_run_args(parser)
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if argv[i] in takes_value and i + 1 < len(argv):
            flag, eq, value = argv[i], "=", argv[i + 1]
            i += 1
        if flag in takes_value and eq:
            out.append(f"{flag}={_DASHES if value == '--' else value}")
        else:
            out.append(argv[i])
        i += 1
    return out


def _usable(fd, stream, check):
    if stream is None:
        return False
    try:
        check(fd)  # 0 bytes: the kernel still checks that the fd is open for that direction
        return True
    except OSError:
        return False


def _standard_streams():
    """(stdout's binary stream, or None when it cannot be written; stderr's text stream). A closed
    standard fd (`<&-`, `>&-`, `2>&-`) is reopened on /dev/null first, so no file this process
    opens gets its number: closed stdin reads as empty, an unwritable stderr discards messages
    (the exit status still tells success from failure)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if not _usable(0, sys.stdin, lambda fd: os.read(fd, 0)):
        sys.stdin = None
    if not _usable(2, sys.stderr, lambda fd: os.write(fd, b"")):
        sys.stderr = open(os.devnull, "w")
    if not _usable(1, sys.stdout, lambda fd: os.write(fd, b"")):
        sys.stdout = open(os.devnull, "w")  # nothing is written to it; Python flushes it at exit
        return None, sys.stderr
    return sys.stdout.buffer, sys.stderr


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # llama2.c's form `run model.bin -i …`: a first argument that is a file means `run`
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and os.path.isfile(argv[0]):
        argv.insert(0, "run")
    argv = _value_after_flag(argv)
    out, err = _standard_streams()
    try:
        args = get_parser().parse_args(argv)
        for key, value in vars(args).items():
            if value == _DASHES:
                setattr(args, key, "--")
        if args.command is None:
            get_parser().print_help()
            return 1
        if out is None:
            raise PyllamaError("standard output is closed or not writable: nothing to write the output to")
        handler = {"run": cmd_run, "chat": cmd_run, "info": cmd_info, "bench": cmd_bench,
                   "convert": cmd_convert, "serve": cmd_serve}[args.command]
        return handler(args, out, err)
    except _UsageError as e:
        err.write(f"pyllama: error: {e}\n")
        return 1
    except BrokenPipeError:  # e.g. `pyllama run … | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (PyllamaError, MemoryError, OSError) as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, MemoryError):
            msg = f"out of memory: {msg}"
        err.write(f"pyllama: error: {msg}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\npyllama: interrupted\n")
        return 130
