"""``localglm.load``: config + tokenizer + weights -> a ready ``LocalGLM``."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import weights
from .config import ModelConfig
from .engine import LocalGLM
from .errors import LocalGLMError, ModelFormatError
from .model import ChatGLMModel, RotaryTable
from .tokenizer import ChatGLMTokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8", "int4")


def canonical_precision(p: str) -> str:
    p = p.lower()
    if p in DTYPES:
        return str(DTYPES[p]).removeprefix("torch.")
    if p in ("int8", "int4", "auto", "q8", "q4"):
        return {"q8": "int8", "q4": "int4"}.get(p, p)
    raise LocalGLMError(f"unknown precision {p!r}; choose one of {', '.join(PRECISIONS)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LocalGLMError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LocalGLMError("CUDA was asked for but this PyTorch build sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LocalGLMError("MPS was asked for but is not available on this machine")
    return dev


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """Fastest well-supported activation dtype: fp16 on GPUs, bf16 on CPUs."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16


def load(
    path: str | os.PathLike,
    precision: str = "auto",
    device: str | torch.device | None = "auto",
    compute_dtype: str | torch.dtype | None = None,
    max_context: int | None = None,
    ptuning: str | os.PathLike | None = None,
    progress: bool = False,
) -> LocalGLM:
    """Load a ChatGLM-6B model directory (or a cached Hugging Face model id).

    precision: "float32", "bfloat16", "float16", "int8", "int4" or "auto" (the checkpoint's
    own precision, in the device's fastest float type). compute_dtype: activation dtype for
    quantized weights (default: the device's fastest). ptuning: a P-Tuning v2 checkpoint dir.
    """
    model_dir = weights.resolve_model_path(path)
    cfg = ModelConfig.from_file(model_dir / "config.json")
    tokenizer = ChatGLMTokenizer.from_dir(model_dir)
    dev = resolve_device(device)
    precision = canonical_precision(precision)
    prefix_tensors = {}
    if ptuning is not None:
        prefix_tensors = read_ptuning(Path(ptuning), cfg)
    if cfg.quantization_bit:
        raise LocalGLMError(
            f"{model_dir} holds int{cfg.quantization_bit} weights; quantized checkpoints are "
            "not supported by this build"
        )
    if precision == "auto":
        precision = str(default_compute_dtype(dev)).removeprefix("torch.")
    if precision in ("int8", "int4"):
        raise LocalGLMError(f"precision {precision} is not supported by this build")
    dtype = DTYPES[precision]
    if compute_dtype is not None:
        dtype = DTYPES[str(compute_dtype).removeprefix("torch.")]

    with torch.device("meta"):
        model = ChatGLMModel(cfg)

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=dev, dtype=dtype if t.is_floating_point() else t.dtype)

    def ignore(name: str) -> bool:
        # Tied head and the rotary buffers are rebuilt, as the official model does.
        return name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")

    tensors = weights.iter_checkpoint(model_dir, progress=progress)
    if prefix_tensors:
        tensors = _chain(tensors, prefix_tensors.items())
    weights.load_into(model, tensors, convert, str(model_dir), ignore)
    model.rotary = RotaryTable(cfg.head_dim // 2, cfg.max_sequence_length).to(dev)
    return LocalGLM(model, tokenizer, dtype, max_context=max_context, precision=precision,
                    path=str(model_dir))


def _chain(*iterables):
    for it in iterables:
        yield from it


def read_ptuning(ptuning_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Prefix-encoder tensors of a P-Tuning v2 checkpoint; sets pre_seq_len on ``cfg``."""
    if not ptuning_dir.is_dir():
        raise ModelFormatError(f"P-Tuning checkpoint {ptuning_dir} is not a directory")
    prefix = "transformer.prefix_encoder."
    tensors = {k: v for k, v in weights.iter_checkpoint(ptuning_dir) if k.startswith(prefix)}
    if not tensors:
        raise ModelFormatError(
            f"{ptuning_dir} has no {prefix}* tensors; is it a P-Tuning v2 checkpoint?")
    extra = {}
    if (ptuning_dir / "config.json").exists():
        import json

        extra = json.loads((ptuning_dir / "config.json").read_text(encoding="utf-8"))
    emb = tensors.get(prefix + "embedding.weight")
    pre_seq_len = extra.get("pre_seq_len") or (emb.shape[0] if emb is not None else None)
    if not pre_seq_len:
        raise ModelFormatError(f"{ptuning_dir}: cannot tell pre_seq_len")
    cfg.pre_seq_len = int(pre_seq_len)
    has_trans = prefix + "trans.0.weight" in tensors
    cfg.prefix_projection = bool(extra.get("prefix_projection", has_trans))
    return tensors
