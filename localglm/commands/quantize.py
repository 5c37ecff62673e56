"""`localglm quantize`: convert a model once (int8/int4, or float safetensors) for fast loads."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .. import weights
from ..convert import FLOAT_TYPES, convert_model
from ..errors import LocalGLMError
from ..quantize import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    QUANTIZED_LINEAR_NAMES,
    SCALE_SUFFIXES,
)
from ..quantize.embedding import EMBEDDING_NAME
from .common import group_size

_HEADER_BYTES = 256  # safetensors header per tensor, generously
_SLACK = 64 << 10  # config.json, rounding


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="SRC", help="model (or P-Tuning checkpoint) directory")
    p.add_argument("-o", "--output", required=True, metavar="DST",
                   help="new directory to write (safetensors + config.json + tokenizer); "
                   "checked before anything is read: it must not exist or be empty, and its "
                   "disk must be writable and have room for the result")
    p.add_argument("--precision", required=True,
                   choices=["int4", "int8", "float16", "bfloat16", "float32"],
                   help="int4/int8 quantize the block linears; float16/bfloat16/float32 only "
                   "re-save (e.g. pickled .bin files as safetensors)")
    p.add_argument("--group-size", type=int, default=None,
                   choices=(0, *INT4_GROUP_SIZES),
                   help="int4 group size (0 = one scale per row, THUDM's own int4 recipe; "
                   f"32 = lower error, 25%% more bytes; default: {DEFAULT_GROUP_SIZE})")


def _tensor_bytes(name: str, t: weights.TensorInfo, bits: int, group_size: int,
                  float_itemsize: int | None) -> int:
    """Bytes one source tensor takes in the output (with its scales when it gets quantized)."""
    if weights.rebuilt_on_load(name):
        return 0  # not written
    floating = t.dtype.is_floating_point and not name.endswith(SCALE_SUFFIXES)
    linear = name.endswith(tuple(f".{n}.weight" for n in QUANTIZED_LINEAR_NAMES))
    if bits and name == EMBEDDING_NAME and floating:  # the int8 head, one fp16 scale per row
        return t.shape[0] * t.shape[1] + t.shape[0] * 2
    if bits and linear and floating and len(t.shape) == 2:
        rows, cols = t.shape
        if bits == 8:
            return rows * cols + rows * t.dtype.itemsize
        if not group_size:
            return rows * math.ceil(cols / 2) + rows * t.dtype.itemsize
        return rows * math.ceil(cols / 2) + 2 * rows * math.ceil(cols / group_size) * 2
    if float_itemsize and floating:
        return math.prod(t.shape) * float_itemsize
    return t.nbytes


def output_bytes(src: Path, tensors: dict[str, weights.TensorInfo], precision: str,
                 group_size: int) -> int:
    """About how many bytes the converted model directory takes, from the source's headers."""
    bits = {"int8": 8, "int4": 4}.get(precision, 0)
    itemsize = FLOAT_TYPES[precision].itemsize if precision in FLOAT_TYPES else None
    total = sum(_tensor_bytes(n, t, bits, group_size if bits == 4 else 0, itemsize)
                + _HEADER_BYTES for n, t in tensors.items())
    extra = sum((src / n).stat().st_size for n in weights.TOKENIZER_FILES if (src / n).is_file())
    return total + extra + _SLACK


def main(args: argparse.Namespace) -> int:
    args.group_size = group_size(args, DEFAULT_GROUP_SIZE)  # refused unless --precision int4
    dst = Path(args.output)
    weights.check_output_dir(dst)  # a bad -o fails now, not after the conversion
    src = weights.resolve_model_path(args.model)
    report = weights.validate_model_dir(src, ptuning_ok=True)  # headers only
    weights.check_output_dir(dst, output_bytes(src, report.tensors, args.precision,
                                               args.group_size))
    t = time.perf_counter()
    try:
        convert_model(src, dst, args.precision, args.group_size, progress=sys.stderr.isatty())
    except OSError as e:  # e.g. a source file that vanished or became unreadable meanwhile
        raise LocalGLMError(weights.os_error_message(e, Path(e.filename or dst))) from None
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"wrote {dst} ({size / 2**20:.1f} MiB, {args.precision}) in "
          f"{time.perf_counter() - t:.1f} s; load it with `localglm chat {dst}`")
    return 0
