"""`localglm` command line: dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import LocalGLMError

# name -> (module under localglm.commands, one-line help)
COMMANDS = {
    "chat": ("chat", "chat with a model in the terminal (or answer one prompt with -p)"),
    "serve": ("serve", "serve an OpenAI-compatible API, the official api.py protocol and a web UI"),
    "quantize": ("quantize", "convert a model to int8/int4 (or fp16/bf16 safetensors) once"),
    "doctor": ("doctor", "show this machine, the memory each precision needs and what is picked"),
    "bench": ("bench", "measure load time, prefill and decode speed, and peak memory"),
    "eval": ("evaluate", "perplexity of a model on a text file (and agreement with another)"),
    "finetune": ("finetune", "train a LoRA or P-Tuning v2 adapter on your own data"),
    "merge": ("merge", "merge a LoRA adapter into a model and save the result"),
    "pull": ("pull", "download a model from the Hugging Face Hub (or a mirror) into the cache"),
    "list": ("list_models", "list downloaded models: precision, size and whether complete"),
    "rm": ("rm", "delete a model from the Hugging Face cache"),
}


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``localglm`` parser with the options of ``commands`` (default: every command).

    A command's options are defined by its module, imported only when that command is asked
    for; none of them imports PyTorch at import time, so ``--help`` answers at once.
    """
    parser = argparse.ArgumentParser(
        prog="localglm",
        description="Run, chat with, serve and fine-tune ChatGLM-6B on your own computer.",
        epilog="Run `localglm COMMAND --help` for the options of a command. MODEL is a "
        "ChatGLM-6B directory (e.g. a git clone of THUDM/chatglm-6b-int4) or a model id "
        "already in the Hugging Face cache.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"localglm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS if commands is None else commands
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name not in wanted:
            continue
        try:
            mod = importlib.import_module(f".commands.{module}", __package__)
        except ImportError as e:  # e.g. an optional dependency missing: say so when it is run
            p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_main=_unavailable(name, e))
            continue
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def _unavailable(name: str, error: ImportError):
    def main(args) -> int:
        raise LocalGLMError(f"`localglm {name}` is unavailable here: {error}")
    return main


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser([_command_in(argv)])
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        return args._main(args) or 0
    except LocalGLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
