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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localglm",
        description="Run, chat with, serve and fine-tune ChatGLM-6B on your own computer.",
        epilog="Run `localglm COMMAND --help` for the options of a command. MODEL is a "
        "ChatGLM-6B directory (e.g. a git clone of THUDM/chatglm-6b-int4) or a model id "
        "already in the Hugging Face cache.",
    )
    parser.add_argument("--version", action="version", version=f"localglm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f".commands.{module}", __package__)
        except ImportError:
            continue  # a command whose module is not part of this build
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
