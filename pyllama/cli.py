"""The `pyllama` command: `run` (llama2.c's flags), `chat`, `info`.

Every error a user can cause ends as one line `pyllama: error: …` on stderr and exit status 1.
"""
import argparse
import os
import sys
import time

from ._version import __version__
from .errors import PyllamaError

COMMANDS = ("run", "chat", "info", "bench", "convert")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


class _UsageError(Exception):
    pass


def _add_run_args(p):
    p.add_argument("checkpoint", help="model file: llama2.c .bin (legacy, V1, V2) or GGUF")
    p.add_argument("-t", "--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature, 0 = greedy argmax (default 1.0)")
    p.add_argument("-p", "--topp", type=float, default=0.9, metavar="P",
                   help="top-p (nucleus) sampling in [0,1]; 0 or 1 = off (default 0.9)")
    p.add_argument("-s", "--seed", type=int, default=0, metavar="S",
                   help="random seed; 0 = from the clock (default)")
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
                   help="CPU threads (default: all available cores)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="KV cache positions (default: the model's seq_len)")


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
    return parser


def _version_string():
    try:
        from . import build_info
        return f"pyllama {__version__} ({build_info()})"
    except Exception as e:  # the core failed to import: still say what we are
        return f"pyllama {__version__} (core not loaded: {e})"


def _check_args(args):
    from .errors import ParameterError
    if args.threads is not None and args.threads < 1:
        raise ParameterError(f"--threads: expected a number >= 1, found {args.threads}")
    if args.steps < 0:
        raise ParameterError(f"--steps: expected a number >= 0, found {args.steps}")
    if args.context is not None and args.context < 1:
        raise ParameterError(f"--context: expected a number >= 1, found {args.context}")


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
    from .generate import encode_prompt, generate_tokens, make_sampler, resolve_steps
    from .llama import Llama
    from .errors import TokenizerError
    from .formats import load
    _check_args(args)
    mf = load(args.checkpoint)
    # the KV cache holds the positions this run can reach (steps), not always the model's seq_len
    limit = args.context or mf.config.get("seq_len", 1)
    steps = resolve_steps(args.steps, limit)
    model = Llama(mf, tokenizer=args.tokenizer, threads=args.threads, n_ctx=args.context or steps)
    if model.tokenizer is None:
        raise TokenizerError(model.tokenizer_problem or f"no tokenizer: {args.checkpoint} has "
                             f"none and no tokenizer.bin was found beside it or in the working "
                             f"directory (use -z PATH)")
    sampler = make_sampler(model._model, args.temperature, args.topp, args.seed)
    if args.mode == "chat" or args.command == "chat":
        return _chat(model, sampler, _argv_text(args.prompt), _argv_text(args.system, "--system"), steps,
                     out)
    tok = model.tokenizer
    stops = model.stop_ids  # None: llama2.c's rule for .bin files
    ids = encode_prompt(tok, _argv_text(args.prompt) or "", limit, bos=True if stops is None else None)
    start, n = None, 0
    for prev, token in generate_tokens(model._model, ids, steps, sampler, bos_id=tok.bos_id,
                                       stop_ids=stops):
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
    out.write(guide.encode())
    out.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        return None
    return line.rstrip(b"\n").decode("utf-8", errors="replace")


def _chat(model, sampler, user_prompt, system_prompt, steps, out):
    """llama2.c's chat(): Llama-2 [INST] turns; user turns from stdin until EOF or steps."""
    tok, m = model.tokenizer, model._model
    eos = tok.eos_id
    prompt_ids, user_idx, user_turn, pos, nxt = [], 0, True, 0, None
    with m._lock:
        while pos < steps:
            if user_turn:
                if pos == 0:
                    system = system_prompt if system_prompt is not None else \
                        _read_line(out, "Enter system prompt (optional): ")
                    if system is None:
                        break
                user = user_prompt if (pos == 0 and user_prompt is not None) else \
                    _read_line(out, "User: ")
                if user is None:
                    break
                if pos == 0 and system:
                    rendered = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
                else:
                    rendered = f"[INST] {user} [/INST]"
                prompt_ids = tok.encode(rendered, bos=True, eos=False)
                user_idx, user_turn = 0, False
                out.write(b"Assistant: ")
            if user_idx < len(prompt_ids):
                token = prompt_ids[user_idx]
                user_idx += 1
            else:
                token = nxt
            if token == eos:
                user_turn = True
            m.forward(token, pos)
            nxt = sampler.sample(m.logits_ptr)
            pos += 1
            if user_idx >= len(prompt_ids) and nxt != eos:
                out.write(tok.safe_piece(token, nxt))
                out.flush()
            if nxt == eos:
                out.write(b"\n")
    out.write(b"\n")
    out.flush()
    return 0


def cmd_info(args, out, err):
    from .info import run
    return run(args, out, err)


def cmd_bench(args, out, err):
    from .bench import run
    from .errors import ParameterError
    for name in ("prompt", "gen", "repeat"):
        if getattr(args, name) < 1:
            raise ParameterError(f"--{name}: expected a number >= 1, found {getattr(args, name)}")
    return run(args, out, err)


def cmd_convert(args, out, err):
    from .convert import run
    return run(args, out, err)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # llama2.c's form `run model.bin -i …`: a first argument that is a file means `run`
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and os.path.isfile(argv[0]):
        argv.insert(0, "run")
    out, err = sys.stdout.buffer, sys.stderr
    try:
        args = get_parser().parse_args(argv)
        if args.command is None:
            get_parser().print_help()
            return 1
        handler = {"run": cmd_run, "chat": cmd_run, "info": cmd_info, "bench": cmd_bench,
                   "convert": cmd_convert}[args.command]
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
