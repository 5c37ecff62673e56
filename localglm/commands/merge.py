"""`localglm merge`: fold a LoRA adapter into a model's weights and save a plain model dir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LocalGLMError

DTYPES = ("float16", "bfloat16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the base model the adapter was trained on")
    p.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter directory (PEFT layout)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="new model directory (safetensors + config + tokenizer files)")
    p.add_argument("--dtype", choices=DTYPES, default="float16",
                   help="weight dtype of the merged model (default: float16, as the official "
                   "checkpoint); the merge itself is computed in float32")
    p.add_argument("--device", default="cpu", help="where to merge (default: cpu)")


def merged_state(model) -> dict:
    """The model's tensors under the official names, with the tied head the official code reads."""
    state = dict(model.state_dict())
    # The official modeling code loads lm_head.weight (tied to the embeddings); safetensors
    # cannot store two names for one tensor, hence the copy.
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    return state


def main(args: argparse.Namespace) -> int:
    from ..finetune.lora import load_adapter
    from ..loader import load
    from ..weights import save_model_dir

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LocalGLMError(f"{out} exists and is not empty; choose a new output directory")
    llm = load(args.model, precision=args.dtype, device=args.device,
               progress=sys.stderr.isatty())
    if llm.config.quantization_bit:
        raise LocalGLMError("merging needs a float base model, not a quantized one")
    load_adapter(llm.model, args.adapter, merge=True)
    config = llm.config.to_dict()
    config["torch_dtype"] = args.dtype
    save_model_dir(out, merged_state(llm.model), config, copy_from=Path(llm.path))
    print(f"merged {args.adapter} into {args.model}: {out}")
    return 0
