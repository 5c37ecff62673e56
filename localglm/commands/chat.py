"""`localglm chat`: streaming multi-turn chat in the terminal, or one answer with -p."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

from ..chat import normalize_history, response_streamer, tokens
from ..demo import NAME as DEMO
from ..errors import ContextTooLongError, LocalGLMError
from ..options import CHAT_DEFAULTS
from .common import add_generation_arguments, add_model_arguments, generation_kwargs, load_from_args

HELP = """commands (a command is the whole line; anything else is a question for the model):
  clear, /clear      forget the conversation
  stop, /exit        quit (Ctrl-D too)
  /regen             answer the last question again
  /save FILE         save the conversation (JSON, the API's history format)
  /load FILE         continue a saved conversation
  /help              this text
Ctrl-C while an answer streams stops that answer and keeps the conversation."""
QUIT_HINT = "(type stop or press Ctrl-D to quit)"

# The official demo's whole-line words, and the slash commands.
_WORDS = {"stop": "/exit", "clear": "/clear"}
_COMMANDS = {"/exit", "/quit", "/clear", "/help", "/regen", "/save", "/load"}
_SLASH_WORD = re.compile(r"/[A-Za-z]*")  # "/usr/bin 是什么?" is a question, "/sav" a typo


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
    print(f"localglm: {model.describe()}", file=sys.stderr, flush=True)
    gen = generation_kwargs(args)
    if prompt is not None:
        try:
            answer(model, prompt, history, gen)
        except ContextTooLongError as e:
            raise LocalGLMError(context_error(e, args, model.config.max_sequence_length)) from None
        return 0
    return interactive(model, history, gen, args)


def parse_command(line: str) -> tuple[str, str] | None:
    """(command, argument) if the stripped ``line`` is a chat command, else None (a question).

    A command is the whole line: ``stop``, ``clear``, or a ``/word`` with, for /save and
    /load, a file name. A ``/word`` that is no command gives ("?", word).
    """
    line = line.strip()
    if line in _WORDS:
        return _WORDS[line], ""
    word, _, arg = line.partition(" ")
    if not _SLASH_WORD.fullmatch(word):
        return None
    if word not in _COMMANDS:
        return "?", word
    return word, arg.strip()


def load_history(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("history", [])
        return normalize_history(data)
    except FileNotFoundError:
        raise LocalGLMError(f"{path} does not exist") from None
    except OSError as e:
        raise LocalGLMError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise LocalGLMError(f"{path} is not a saved conversation: {e}") from None


def save_history(path: Path, history) -> None:
    """Write the conversation to ``path`` (whole or not at all: a temporary file is renamed)."""
    if path.is_dir():
        raise LocalGLMError(f"cannot save to {path}: it is a folder; give a file name, "
                            f"e.g. {path / 'chat.json'}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps({"history": [list(r) for r in history]}, ensure_ascii=False,
                                  indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not path.parent.is_dir():
            why = f"the folder {path.parent} does not exist; create it or choose another file"
        elif isinstance(e, PermissionError):
            why = "permission denied; choose a file in a folder you can write to"
        else:
            why = e.strerror or str(e)
        raise LocalGLMError(f"cannot save to {path}: {why}") from None


def context_error(e: ContextTooLongError, args: argparse.Namespace, context: int) -> str:
    """A message that does not fit, said in terms of this command's flags."""
    if e.prompt_tokens is None:
        return str(e)
    fixes = ["shorten it"]
    kept = f"{tokens(e.reserved)} left for the answer"
    if args.max_new_tokens is not None:
        kept = f"the {tokens(e.reserved)} --max-new-tokens keeps for the answer"
        fixes.append("lower --max-new-tokens")
    limit = f"the model's {e.budget}-token context"
    for flag in ("max_length", "max_context"):
        if getattr(args, flag) == e.budget < context:
            name = "--" + flag.replace("_", "-")
            limit = f"{name} {e.budget}"
            fixes.append(f"raise {name} (the model's context holds {tokens(context)})")
            break
    return (f"your message is {tokens(e.prompt_tokens)}; with {kept} it does not fit {limit}: "
            + " or ".join(fixes))


def answer(model, query: str, history, gen: dict, out=None):
    """Stream one answer to ``out`` (default: stdout); returns the new history.

    Ctrl-C stops the answer; the partial answer is shown whole and kept in the history. Returns
    None when no answer was started.
    """
    out = out or sys.stdout  # looked up per call: stdout may be replaced (tests, redirection)
    streamer = response_streamer()  # holds back what post-processing may still change
    step = None
    try:
        for step in model.chat_stream(query, history, **gen):
            out.write(streamer.push(step.response, final=step.finish_reason is not None))
            out.flush()
    except KeyboardInterrupt:
        if step is not None:
            out.write(streamer.push(step.response, final=True))
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    if step is None:
        return None
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


def interactive(model, history, gen: dict, args: argparse.Namespace) -> int:
    read = _reader()
    print("Type /help for commands; stop or Ctrl-D quits.")
    while True:
        try:
            line = read("\n用户: ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print(QUIT_HINT)
            continue
        if not line:
            continue
        command = parse_command(line)
        if command is None:
            history = ask(model, line, history, gen, args)
        elif command in (("/exit", ""), ("/quit", "")):
            return 0
        else:
            history = run_command(*command, model=model, history=history, gen=gen, args=args)


def ask(model, query: str, history, gen: dict, args: argparse.Namespace, keep=None):
    """Answer ``query``; the new history, or ``keep`` (default: ``history``) if none came."""
    keep = history if keep is None else keep
    print("\nChatGLM: ", end="", flush=True)
    try:
        new = answer(model, query, history, gen)
    except ContextTooLongError as e:
        print(f"error: {context_error(e, args, model.config.max_sequence_length)}")
        return keep
    except LocalGLMError as e:
        print(f"error: {e}")
        return keep
    return keep if new is None else new


def run_command(name: str, arg: str, model, history, gen: dict, args: argparse.Namespace):
    """Run a chat command other than quitting; returns the history it leaves."""
    if name == "?":
        print(f"unknown command {arg}\n{HELP}")
    elif arg and name not in ("/save", "/load"):
        print(f"{name} takes no argument; /help lists the commands")
    elif name == "/help":
        print(HELP)
    elif name == "/clear":
        print("(conversation cleared)")
        return []
    elif name == "/regen":
        if not history:
            print("(nothing to answer again)")
            return history
        return ask(model, history[-1][0], history[:-1], gen, args, keep=history)
    elif not arg:
        print(f"usage: {name} FILE")
    else:
        try:
            if name == "/save":
                save_history(Path(arg), history)
                print(f"(saved {len(history)} round(s) to {arg})")
            else:
                history = load_history(Path(arg))
                print(f"(loaded {len(history)} round(s) from {arg})")
        except LocalGLMError as e:
            print(f"error: {e}")
    return history
