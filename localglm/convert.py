"""Checkpoint conversion: quantize or re-type a checkpoint's tensors as they stream past."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from . import quantize, weights
from .config import ModelConfig
from .errors import LocalGLMError
from .quantize.embedding import EMBEDDING_NAME, HEAD_BITS, quantize_embedding

Tensors = Iterator[tuple[str, torch.Tensor]]
FLOAT_TYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quantize_head(tensors: Tensors) -> Tensors:
    """Quantize the tied embedding / output head to int8 as it streams past."""
    for name, t in tensors:
        if name == EMBEDDING_NAME and t.is_floating_point():
            q, scale = quantize_embedding(t)
            yield from ((name, q), (name + "_scale", scale))
        else:
            yield name, t


def dequantize_head(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """The inverse of `quantize_head`, for devices that run a float head."""
    pending = {}
    for name, t in tensors:
        if name in (EMBEDDING_NAME, EMBEDDING_NAME + "_scale"):
            pending[name] = t
            if len(pending) == 2:
                w = quantize.dequantize_int8(pending[EMBEDDING_NAME],
                                             pending[EMBEDDING_NAME + "_scale"], dtype)
                yield EMBEDDING_NAME, w
        else:
            yield name, t


def quantize_stream(tensors: Tensors, bits: int, group_size: int) -> Tensors:
    """Quantize the block linears' weights as they stream past; other tensors pass through.

    Only one float weight matrix is alive at a time, so peak memory stays near the size of
    the quantized model plus one shard. group_size 0 is THUDM's per-row recipe (the output
    is then bit-identical to their int4/int8 checkpoints).
    """
    linears = tuple(f".{n}.weight" for n in quantize.QUANTIZED_LINEAR_NAMES)
    for name, t in tensors:
        if not name.endswith(linears):
            yield name, t
        elif bits == 8:
            q, scale = quantize.quantize_int8_official(t)
            yield from ((name, q), (name + "_scale", scale))
        elif group_size == 0:
            q, scale = quantize.quantize_int4_official(t)
            yield from ((name, q), (name + "_scale", scale))
        else:
            q, scale, zero = quantize.quantize_int4_grouped(t, group_size)
            yield from ((name, q), (name + "_scale", scale), (name + "_zero", zero))


def cast_floats(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """Cast float tensors (not quantization scales) to ``dtype``."""
    for name, t in tensors:
        if t.is_floating_point() and not name.endswith(quantize.SCALE_SUFFIXES):
            t = t.to(dtype)
        yield name, t


def convert_model(src: Path, dst: Path, precision: str,
                  group_size: int = quantize.DEFAULT_GROUP_SIZE,
                  progress: bool = True, head_bits: int = HEAD_BITS) -> ModelConfig:
    """Write ``src`` as a safetensors model directory at ``dst`` in ``precision``.

    int8/int4 quantize the block linears (a pre-quantized source is re-saved as it is, only
    in safetensors); float16/bfloat16/float32 re-type the floats. P-Tuning checkpoints (no
    tokenizer, prefix encoder only) are converted too. Written to a temp dir, then renamed.
    """
    cfg = ModelConfig.from_file(src / "config.json")
    tensors = weights.iter_checkpoint(src)
    bits = {"int8": 8, "int4": 4}.get(precision, 0)
    if bits:
        if cfg.quantization_bit and cfg.quantization_bit != bits:
            raise LocalGLMError(f"{src} is int{cfg.quantization_bit}; it cannot become "
                                f"int{bits} (convert the float model instead)")
        if not cfg.quantization_bit:
            group_size = group_size if bits == 4 else 0
            tensors = quantize_stream(tensors, bits, group_size)
            cfg.quantization_bit = bits
            cfg.quantization_group_size = group_size
            cfg.quantization_format = "localglm" if group_size else "official"
        if head_bits and not cfg.quantization_head_bits:
            tensors = quantize_head(tensors)
            cfg.quantization_head_bits = HEAD_BITS
    elif precision in FLOAT_TYPES:
        if cfg.quantization_bit:
            raise LocalGLMError(f"{src} holds int{cfg.quantization_bit} weights; use "
                                f"--precision int{cfg.quantization_bit} to re-save it")
        tensors = cast_floats(tensors, FLOAT_TYPES[precision])
        cfg.torch_dtype = precision
    else:
        raise LocalGLMError(f"unknown precision {precision!r}")
    state = {}
    bar = _bar(progress, cfg)
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
            continue  # rebuilt on load (the head is tied to the embedding)
        state[name] = t
        if bar is not None and name.endswith("post_attention_layernorm.weight"):
            bar.update()
    if bar is not None:
        bar.close()
    config = cfg.to_dict()
    config.pop("auto_map", None)  # names remote code that the directory does not contain
    weights.save_model_dir(dst, state, config, copy_from=src)
    return cfg


def _bar(progress: bool, cfg: ModelConfig):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.num_layers, desc="converting", unit="layer")
