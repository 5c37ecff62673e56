"""Options shared by several commands: the model to load and how to generate.

Every flag is checked once, here: numbers by argparse ``type=`` functions built from the same
rules ``GenerationConfig`` applies to every caller, limits that depend on the model against its
config.json before any weights load. Nothing here imports PyTorch (``--help`` stays instant).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import LocalGLMError, ModelFormatError
from ..options import GenerationConfig, check_option

# do_sample follows --temperature; the others are API-only
_SKIP = {"do_sample", "stop", "logprobs", "json_object"}
_INTS = {"max_new_tokens", "max_length", "top_k", "seed"}


def option_type(name: str, kind: type):
    """argparse ``type=`` for the generation option ``name``: parse, then apply its rule."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'whole number' if kind is int else 'number'}") from None
        problem = check_option(name, value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be at least 1 (--max-context, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """MODEL and the options that say how to load it; with ``default``, MODEL is optional."""
    optional = {"nargs": "?", "default": default} if default else {}
    p.add_argument("model", metavar="MODEL", **optional,
                   help="model directory or Hugging Face model id (from the local cache); "
                   "'demo' is the small built-in model" +
                   (f" (default: {default})" if default else ""))
    p.add_argument("--precision", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "int8", "int4"],
                   help="weight precision (default: auto, chosen from the checkpoint and the "
                   "memory this machine has)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--compute-dtype", default=None,
                   choices=["float32", "bfloat16", "float16"],
                   help="activation dtype for int8/int4 weights (default: fastest for the "
                   "device; float32 is the exact reference path)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="context budget in tokens per chat (default and most: the model's "
                   "maximum); older rounds are dropped to fit")
    p.add_argument("--ptuning", default=None, metavar="DIR",
                   help="P-Tuning v2 checkpoint directory to apply")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--devices", default=None,
                   help="split the layers over several devices, e.g. cuda:0,cuda:1")


def add_generation_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    """One flag per GenerationConfig field, with the field's help text and range.

    ``defaults`` are the values used when a flag is not given (shown in --help); the flags
    themselves default to None so that the limits checked against the model apply only to
    what the user asked for.
    """
    g = p.add_argument_group("generation")
    for f in dataclasses.fields(GenerationConfig):
        if f.name in _SKIP:
            continue
        default = defaults.get(f.name, f.default)
        shown = "none" if default is None else default
        g.add_argument("--" + f.name.replace("_", "-"), default=None,
                       type=option_type(f.name, int if f.name in _INTS else float),
                       help=f"{f.metadata['help']} (default: {shown})")


def group_size(args: argparse.Namespace, default: int) -> int:
    """The int4 group size asked for (``default`` if none); an error when --group-size comes
    with another precision, where it would be ignored."""
    if args.group_size is None:
        return default
    if args.precision != "int4":
        raise LocalGLMError(f"--group-size applies to --precision int4 only, not "
                            f"{args.precision}; leave it out")
    return args.group_size


def generation_kwargs(args: argparse.Namespace) -> dict:
    """The generation options the user gave (the rest keep the command's defaults)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig)
          if f.name not in _SKIP and getattr(args, f.name, None) is not None}
    if "temperature" in kw:
        kw["do_sample"] = kw["temperature"] > 0
    return kw


def check_model_limits(args: argparse.Namespace, context: int, config_path) -> None:
    """Flags that may not exceed the model's context of ``context`` tokens."""
    where = f"the model's context ({config_path}: max_sequence_length)"
    for flag in ("max_context", "max_length"):
        value = getattr(args, flag, None)
        if value is not None and value > context:
            raise LocalGLMError(f"--{flag.replace('_', '-')} {value} is more than the "
                                f"{context} tokens of {where}; use at most {context}")
    budget = min(v for v in (context, getattr(args, "max_context", None),
                             getattr(args, "max_length", None)) if v is not None)
    new = getattr(args, "max_new_tokens", None)
    if new is not None and new >= budget:
        raise LocalGLMError(f"--max-new-tokens {new} leaves no room for a question in a "
                            f"{budget}-token context; use less than {budget}")


def load_from_args(args: argparse.Namespace, **extra):
    """Check the flags against the model's config, then load it."""
    from ..config import ModelConfig
    from ..demo import MODEL_DIR, NOTICE, is_demo
    from ..loader import load
    from ..weights import resolve_model_path

    path = (MODEL_DIR if is_demo(args.model) else resolve_model_path(args.model)) / "config.json"
    try:
        context = ModelConfig.from_file(path).max_sequence_length
    except ModelFormatError:
        context = None  # load() reports this with every other problem of the directory
    if context is not None:
        check_model_limits(args, context, path)
    if is_demo(args.model):
        print(NOTICE, file=sys.stderr, flush=True)
    model = load(args.model, precision=args.precision, device=args.device,
                 compute_dtype=args.compute_dtype, max_context=args.max_context,
                 ptuning=args.ptuning, adapter=args.adapter, devices=args.devices,
                 progress=sys.stderr.isatty(), **extra)
    return model
