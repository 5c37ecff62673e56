"""`localglm eval`: perplexity on a text file, and agreement with a reference model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LocalGLMError
from .common import add_model_arguments, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    p.add_argument("--reference", default=None, metavar="MODEL2",
                   help="also report per-token KL and top-1 agreement against this model "
                   "(e.g. the float model when MODEL is int4)")
    p.add_argument("--reference-precision", default="auto",
                   help="precision of the reference model (default: auto)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")


def main(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate
    from ..loader import load

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LocalGLMError(f"cannot read {args.text}: {e}") from None
    model = load_from_args(args)
    ref = None
    if args.reference:
        ref = load(args.reference, precision=args.reference_precision, device=args.device)
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda xs: tqdm(xs, desc="scoring", unit="window")  # noqa: E731
    try:
        r = evaluate(model, text, args.window, ref, progress)
    except ValueError as e:
        raise LocalGLMError(str(e)) from None
    print(f"{model.path} ({model.precision}, {str(model.dtype).removeprefix('torch.')}): "
          f"perplexity {r.perplexity:.3f} over {r.tokens} tokens")
    if ref is not None:
        print(f"vs {ref.path} ({ref.precision}): mean KL {r.kl:.5f} nats/token, top-1 "
              f"agreement {100 * r.top1_agreement:.1f} %, max |logit diff| {r.max_logit_diff:.3f}")
    return 0
