"""Write a full-size ChatGLM-6B with random weights as a converted localglm model directory.

The directory is what `localglm quantize` writes (safetensors in the layout the kernels read,
config.json with the quantization fields, the tokenizer), so `localglm bench --model DIR`
measures loading from disk and the peak memory of a real run without the real weights. The
weights are built directly in the target format (never as float32); the tokenizer is the small
test tokenizer, whose ids all lie inside the full vocabulary.

    python benchmarks/make_synthetic_model.py OUT_DIR [--precision int4] [--group-size 128]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from localglm import bench, weights
from localglm.quantize import DEFAULT_GROUP_SIZE
from localglm.quantize.embedding import HEAD_BITS

TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "data" / "chatglm-6b-tiny"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--precision", default="int4", choices=["int4", "int8"])
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE)
    args = p.parse_args()
    t = time.perf_counter()
    group = args.group_size if args.precision == "int4" else 0
    model = bench.synthetic_model(bench.CHATGLM_6B, args.precision, torch.bfloat16, group)
    cfg = bench.CHATGLM_6B.to_dict()
    cfg.update(quantization_bit=4 if args.precision == "int4" else 8,
               quantization_group_size=group,
               quantization_format="localglm" if group else "official",
               quantization_head_bits=HEAD_BITS, torch_dtype="bfloat16")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("rotary.")}
    weights.save_model_dir(args.out, state, cfg)
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, args.out / name)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
