"""`localglm quantize`: convert a model once (int8/int4, or float safetensors) for fast loads."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..convert import convert_model
from ..quantize import INT4_GROUP_SIZES
from ..weights import resolve_model_path
from .common import add_group_size_argument, group_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="SRC", help="model (or P-Tuning checkpoint) directory")
    p.add_argument("-o", "--output", required=True, metavar="DST",
                   help="new directory to write (safetensors + config.json + tokenizer)")
    p.add_argument("--precision", required=True,
                   choices=["int4", "int8", "float16", "bfloat16", "float32"],
                   help="int4/int8 quantize the block linears; float16/bfloat16/float32 only "
                   "re-save (e.g. pickled .bin files as safetensors)")
    add_group_size_argument(p, choices=(0, *INT4_GROUP_SIZES))


def main(args: argparse.Namespace) -> int:
    src = resolve_model_path(args.model)
    dst = Path(args.output)
    t = time.perf_counter()
    convert_model(src, dst, args.precision, group_size(args), progress=sys.stderr.isatty())
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst} ({size / 2**20:.1f} MiB, {args.precision}) in "
          f"{time.perf_counter() - t:.1f} s; load it with `localglm chat {dst}`")
    return 0
