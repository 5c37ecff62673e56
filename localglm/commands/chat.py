"""`localglm chat`: streaming multi-turn chat in the terminal, or one answer with -p."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..chat import normalize_history
from ..demo import NAME as DEMO
from ..engine import CHAT_DEFAULTS
from ..errors import LocalGLMError
from .common import add_generation_arguments, add_model_arguments, generation_kwargs, load_from_args

HELP = """commands:
  clear, /clear      forget the conversation
  stop, /exit        quit (Ctrl-D too)
  /regen             answer the last question again
  /save FILE         save the conversation (JSON, the API's history format)
  /load FILE         continue a saved conversation
  /help              this text
Ctrl-C while an answer streams stops that answer and keeps the conversation."""

HOLD = set(",!:;?") | set(" \t\n")  # may still change once the next character is known


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, default=DEMO)
    p.add_argument("-p", "--prompt", default=None,
                   help="answer this prompt once and exit ('-' or a pipe reads stdin)")
    p.add_argument("--history", default=None, metavar="FILE",
                   help="start from a conversation saved with /save")
    add_generation_arguments(p, {**CHAT_DEFAULTS, "max_new_tokens": None})


def main(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise LocalGLMError("no prompt on standard input")
    history = load_history(Path(args.history)) if args.history else []
    model = load_from_args(args)
    gen = generation_kwargs(args)
    if prompt is not None:
        answer(model, prompt, history, gen)
        return 0
    return interactive(model, history, gen)


def load_history(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("history", [])
        return normalize_history(data)
    except FileNotFoundError:
        raise LocalGLMError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise LocalGLMError(f"{path} is not a saved conversation: {e}") from None


def save_history(path: Path, history) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"history": [list(r) for r in history]}, ensure_ascii=False,
                              indent=2), encoding="utf-8")
    os.replace(tmp, path)


def stable_part(response: str) -> str:
    """The part of a growing response that later tokens can no longer change."""
    end = len(response)
    while end and response[end - 1] in HOLD:
        end -= 1
    return response[:end]


def answer(model, query: str, history, gen: dict, out=None):
    """Stream one answer to ``out`` (default: stdout); returns the new history.

    Ctrl-C stops the answer; the partial answer is kept in the history.
    """
    out = out or sys.stdout  # looked up per call: stdout may be replaced (tests, redirection)
    printed = ""
    step = None
    try:
        for step in model.chat_stream(query, history, **gen):
            shown = step.response if step.finish_reason else stable_part(step.response)
            if shown.startswith(printed) and len(shown) > len(printed):
                out.write(shown[len(printed):])
                out.flush()
                printed = shown
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    if step is None:
        return history
    if step.dropped:
        print(f"(note: the {step.dropped} oldest round(s) did not fit the context and were "
              "left out of this prompt)", file=sys.stderr)
    return step.history


def _reader():
    """Line editing that works everywhere (prompt_toolkit), else plain input()."""
    try:
        from prompt_toolkit import PromptSession

        session = PromptSession()
        return lambda text: session.prompt(text)
    except Exception:
        return input


def interactive(model, history, gen) -> int:
    read = _reader()
    print(f"localglm: {model.describe()}. Type /help for commands.")
    while True:
        try:
            line = read("\n用户: ").strip()
        except EOFError:
            return 0
        except KeyboardInterrupt:
            continue
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        if cmd in ("stop", "/exit", "/quit"):
            return 0
        if cmd in ("clear", "/clear"):
            history = []
            print("(conversation cleared)")
            continue
        if cmd == "/help":
            print(HELP)
            continue
        if cmd in ("/save", "/load"):
            if not arg:
                print(f"usage: {cmd} FILE")
                continue
            try:
                if cmd == "/save":
                    save_history(Path(arg), history)
                    print(f"(saved {len(history)} round(s) to {arg})")
                else:
                    history = load_history(Path(arg))
                    print(f"(loaded {len(history)} round(s) from {arg})")
            except (LocalGLMError, OSError) as e:
                print(f"error: {e}")
            continue
        if cmd == "/regen":
            if not history:
                print("(nothing to answer again)")
                continue
            line, history = history[-1][0], history[:-1]
        print("\nChatGLM: ", end="", flush=True)
        try:
            history = answer(model, line, history, gen)
        except LocalGLMError as e:
            print(f"error: {e}")
