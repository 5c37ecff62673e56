"""`localglm finetune`: train a LoRA adapter or a P-Tuning v2 prefix on your own jsonl data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..errors import LocalGLMError
from .common import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="FILE",
                   help="training data (.jsonl: official ptuning {content, summary}, alpaca "
                   "{instruction, input, output} or chat {messages}; detected per file)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="where the adapter goes (checkpoints in DIR/checkpoint-STEP)")
    p.add_argument("--eval-data", metavar="FILE", help="validation data: its loss is reported")
    _data_arguments(p.add_argument_group("data"))
    _method_arguments(p.add_argument_group("method"))
    _training_arguments(p.add_argument_group("training"))


def _data_arguments(g) -> None:
    g.add_argument("--prompt-column", default="content", help="ptuning format: prompt field")
    g.add_argument("--response-column", default="summary", help="ptuning format: answer field")
    g.add_argument("--history-column", default=None,
                   help="ptuning format: field with [[query, response], ...] earlier rounds")
    g.add_argument("--max-source-len", type=int, default=None,
                   help="official ptuning truncation: keep max-source-len - 1 prompt tokens")
    g.add_argument("--max-target-len", type=int, default=None,
                   help="official ptuning truncation: keep max-target-len - 2 answer tokens")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="cap on the whole sequence in tokens (default: the model's context "
                   "unless --max-source-len/--max-target-len are given)")


def _method_arguments(g) -> None:
    g.add_argument("--method", choices=["lora", "ptuning"], default="lora",
                   help="LoRA adapter (default) or P-Tuning v2 prefix")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default: 16)")
    g.add_argument("--lora-dropout", type=float, default=0.05,
                   help="dropout on the LoRA input (default: 0.05)")
    g.add_argument("--target-modules", default="query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
                   help="comma-separated linears to adapt (default: all four of every block)")
    g.add_argument("--pre-seq-len", type=int, default=128,
                   help="P-Tuning v2 prefix length (default: 128, the official example's)")
    g.add_argument("--prefix-projection", action="store_true",
                   help="P-Tuning v2 with the two-layer prefix projection")


def _training_arguments(g) -> None:
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default: 3)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps to run (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-4 for LoRA, 2e-2 for P-Tuning)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--scheduler", choices=["cosine", "linear", "constant"], default="cosine",
                   help="learning-rate decay after the warmup (default: cosine)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping (0 = off; default: 1.0)")
    g.add_argument("--save-steps", type=int, default=0,
                   help="also save a resumable checkpoint every N steps (default: only the end)")
    g.add_argument("--eval-steps", type=int, default=0,
                   help="evaluate --eval-data every N steps (default: at the end)")
    g.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint directory (OUTPUT/checkpoint-STEP)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="keep all activations (faster, much more memory)")


def train_config(args: argparse.Namespace):
    from ..finetune.train import TrainConfig

    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return TrainConfig(
        method=args.method, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=targets, pre_seq_len=args.pre_seq_len,
        prefix_projection=args.prefix_projection, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        scheduler=args.scheduler, max_grad_norm=args.max_grad_norm, save_steps=args.save_steps,
        eval_steps=args.eval_steps, seed=args.seed,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        progress=sys.stderr.isatty(), base_model=str(args.model))


def read_data(args: argparse.Namespace) -> dict:
    """Parse and check --data and --eval-data without a tokenizer: a broken line is reported
    (FILE:LINE: problem) before the model is loaded."""
    from ..finetune.data import Columns, read_examples

    columns = Columns(args.prompt_column, args.response_column, args.history_column)
    files = {"train": args.data, "eval": args.eval_data}
    return {k: (path, *read_examples(path, columns)) for k, path in files.items() if path}


def encode_data(args: argparse.Namespace, data: dict, tokenizer, max_context: int):
    from ..finetune.data import Limits, encode_examples

    seq = args.max_seq_len
    if seq is None and not (args.max_source_len or args.max_target_len):
        seq = max_context  # longer sequences would not fit the model anyway
    limits = Limits(args.max_source_len, args.max_target_len, seq)
    sets = {k: encode_examples(examples, fmt, path, tokenizer, limits)
            for k, (path, examples, fmt) in data.items()}
    for ds in sets.values():
        print(ds.summary(), file=sys.stderr)
    return sets["train"], sets.get("eval")


def training_compute_dtype(args: argparse.Namespace) -> str | None:
    """float32 activations for int8/int4 bases on a CPU, unless asked otherwise.

    On CPUs without native bf16, PyTorch's bf16 backward matmul through a frozen weight
    (grad @ W) runs 17-80x slower than the forward; float32 is fast and exact there, and with
    integer weights it costs only activation memory.
    """
    if args.compute_dtype is not None or args.precision not in ("int8", "int4"):
        return args.compute_dtype
    from ..loader import resolve_device

    devices = getattr(args, "devices", None)
    return "float32" if not devices and resolve_device(args.device).type == "cpu" else None


def _check_args(args: argparse.Namespace) -> Path:
    if args.ptuning or getattr(args, "adapter", None):
        raise LocalGLMError("finetune trains a new adapter: --ptuning/--adapter do not apply "
                            "(use --resume DIR to continue a run)")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise LocalGLMError(f"{out} is a file; choose a directory for the adapter")
    if out.is_dir() and any(out.iterdir()) and not args.resume:
        raise LocalGLMError(f"{out} is not empty; choose a new directory or pass --resume")
    if args.max_seq_len is not None and args.max_seq_len < 5:
        raise LocalGLMError(f"--max-seq-len {args.max_seq_len} is too small: a sequence needs "
                            "at least 5 tokens ([gMASK] <sop> <eop> and some text)")
    return out


def _slow_dtype_note(args: argparse.Namespace, llm) -> None:
    """Warn about reduced-precision training on a CPU only when the user asked for it."""
    asked = {args.compute_dtype, args.precision} & {"bfloat16", "float16"}  # not "auto"
    if asked and llm.device.type == "cpu" and llm.dtype != torch.float32:
        print(f"note: training with {str(llm.dtype).removeprefix('torch.')} activations on a "
              "CPU can be very slow (PyTorch's reduced-precision backward matmuls); with "
              "--precision int4/int8 the default is float32 activations", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    out = _check_args(args)
    cfg = train_config(args)  # validate the options before the (slow) model load
    data = read_data(args)  # and the data files
    from ..finetune.train import train
    from ..loader import load

    llm = load(args.model, precision=args.precision, device=args.device,
               compute_dtype=training_compute_dtype(args), max_context=args.max_context,
               devices=getattr(args, "devices", None), progress=sys.stderr.isatty())
    _slow_dtype_note(args, llm)
    train_data, eval_data = encode_data(args, data, llm.tokenizer, llm.max_context)
    res = train(llm, train_data, out, cfg, eval_data, resume=args.resume)
    if res.losses:
        print(f"{res.steps} steps: training loss {res.losses[0]:.4f} (first step) -> "
              f"{res.losses[-1]:.4f} (last step)", file=sys.stderr)
    for step, loss in res.eval_losses[-1:]:
        print(f"eval loss at step {step}: {loss:.4f}", file=sys.stderr)
    use = "--adapter" if cfg.method == "lora" else "--ptuning"
    print(f"saved to {out}; try: localglm chat {args.model} {use} {out}")
    return 0
