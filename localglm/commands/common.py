"""Options shared by several commands: the model to load and how to generate."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..generate import GenerationConfig

# do_sample follows --temperature; the others are API-only
_SKIP = {"do_sample", "stop", "logprobs", "json_object"}


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
    p.add_argument("--max-context", type=int, default=None,
                   help="context budget in tokens per chat (default: the model's maximum); "
                   "older rounds are dropped to fit")
    p.add_argument("--ptuning", default=None, metavar="DIR",
                   help="P-Tuning v2 checkpoint directory to apply")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--devices", default=None,
                   help="split the layers over several devices, e.g. cuda:0,cuda:1")


def add_generation_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    """One flag per GenerationConfig field, with the field's help text."""
    g = p.add_argument_group("generation")
    for f in dataclasses.fields(GenerationConfig):
        if f.name in _SKIP:
            continue
        default = defaults.get(f.name, f.default)
        kind = {"max_new_tokens": int, "max_length": int, "top_k": int, "seed": int}.get(
            f.name, float)
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=f"{f.metadata['help']} (default: {default})")


def generation_kwargs(args: argparse.Namespace) -> dict:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig)
          if f.name not in _SKIP}
    kw["do_sample"] = kw["temperature"] > 0
    return kw


def load_from_args(args: argparse.Namespace, **extra):
    from ..demo import NOTICE, is_demo
    from ..loader import load

    if is_demo(args.model):
        print(NOTICE, file=sys.stderr, flush=True)
    model = load(args.model, precision=args.precision, device=args.device,
                 compute_dtype=args.compute_dtype, max_context=args.max_context,
                 ptuning=args.ptuning, adapter=args.adapter, devices=args.devices,
                 progress=sys.stderr.isatty(), **extra)
    return model
