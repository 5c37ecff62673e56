"""``localglm.load``: config + tokenizer + weights -> a ready ``LocalGLM``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import demo, malloc, quantize, weights
from .config import ModelConfig
from .convert import dequantize_head, quantize_head, quantize_stream
from .engine import LocalGLM
from .errors import LocalGLMError, ModelFormatError
from .model import ChatGLMModel, RotaryTable, skeleton
from .quantize import cpu_kernels, torch_kernels
from .quantize.embedding import use_quantized_head
from .quantize.formats import DEFAULT_GROUP_SIZE
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


def default_compute_dtype(device: torch.device, precision: str = "") -> torch.dtype:
    """Fastest well-supported activation dtype: fp16 on GPUs, bf16 on CPUs, and bf16 for int4
    on CUDA GPUs that have it, since PyTorch's CUDA int4 kernel takes bf16 activations only
    (with fp16 every call would dequantize the whole weight)."""
    if device.type == "cuda" and precision == "int4" and torch_kernels.HAS_CUDA_INT4 \
            and torch.cuda.is_bf16_supported():
        return torch.bfloat16
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
    devices: str | list[str] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    adapter: str | os.PathLike | None = None,
    progress: bool = False,
) -> LocalGLM:
    """Load a ChatGLM-6B model directory (or a model id already in the Hugging Face cache).

    ``"demo"`` is the small built-in model that answers questions about localglm.

    precision: "float32", "bfloat16", "float16", "int8", "int4", or "auto": the most precise
    that fits the device's free memory with headroom (see ``localglm doctor``).
    device: "auto" (CUDA > MPS > CPU), "cpu", "cuda", "cuda:N" or "mps".
    devices: e.g. "cuda:0,cuda:1": split the layers over several devices in proportion to
    their free memory. compute_dtype: activation dtype for int8/int4 weights (default: the
    device's fastest; "float32" is the exact reference path). max_context: KV-cache budget
    per conversation (default: the model's max_sequence_length). ptuning: a P-Tuning v2
    checkpoint directory. group_size: int4 group size when quantizing a float checkpoint
    (0 = one scale per row, the official int4 recipe). adapter: a LoRA adapter directory
    (PEFT format) applied on top of the weights.
    """
    model_dir = demo.MODEL_DIR if demo.is_demo(path) else weights.resolve_model_path(path)
    weights.validate_model_dir(model_dir)  # every problem at once, before reading the weights
    cfg = ModelConfig.from_file(model_dir / "config.json")
    tokenizer = ChatGLMTokenizer.from_dir(model_dir)
    prefix_tensors = read_ptuning(Path(ptuning), cfg) if ptuning is not None else {}
    placement = plan_placement(cfg, canonical_precision(precision), device, devices,
                               max_context or cfg.max_sequence_length, compute_dtype)
    model = skeleton(cfg)
    tensors = weights.iter_checkpoint(model_dir, progress=progress)
    if placement.bits:
        stored = stored_quantization(cfg)
        if stored is None:  # quantize a float checkpoint while it streams in
            target = (placement.bits, group_size if placement.bits == 4 else 0)
            tensors = quantize_stream(tensors, *target)
        else:
            target = stored
        quantize.make_quantized_skeleton(model, target[0], target[1],
                                         "localglm" if target[1] else "official")
    tensors = _head_format(model, cfg, placement, tensors)
    if prefix_tensors:
        tensors = _chain(tensors, prefix_tensors.items())
    weights.load_into(model, tensors, placement.convert, str(model_dir))
    model.rotary = RotaryTable(cfg.head_dim // 2, cfg.max_sequence_length).to(
        placement.first)
    if adapter is not None:
        from .finetune.lora import load_adapter

        load_adapter(model, adapter)
    if placement.bits:
        prepare_kernels(model, placement.dtype)
    if placement.first.type == "cpu":
        malloc.return_large_blocks()
    return LocalGLM(model, tokenizer, placement.dtype, max_context=max_context,
                    precision=placement.precision, path=str(model_dir),
                    choice=placement.reason)


def _head_format(model: ChatGLMModel, cfg: ModelConfig, placement: Placement, tensors):
    """int8 head for quantized models on the CPU, where the kernels read it at a quarter of
    bf16's bytes; a float head elsewhere (GPUs have no such kernel here) and in the exact
    float32 mode."""
    want = (placement.bits > 0 and placement.first.type == "cpu"
            and placement.dtype != torch.float32)
    if want:
        use_quantized_head(model)
        return tensors if cfg.quantization_head_bits else quantize_head(tensors)
    if cfg.quantization_head_bits:
        return dequantize_head(tensors, placement.dtype)
    return tensors


def stored_quantization(cfg: ModelConfig) -> tuple[int, int] | None:
    """(bits, group_size) of a pre-quantized checkpoint, or None for a float one."""
    if not cfg.quantization_bit:
        return None
    group = cfg.quantization_group_size if cfg.quantization_format == "localglm" else 0
    return cfg.quantization_bit, group


def prepare_kernels(model: ChatGLMModel, dtype: torch.dtype) -> None:
    """Compile (or load from the cache) the CPU kernels and build PyTorch kernel operands
    now, so the first answer does not pay for them."""
    layers = [m for m in model.modules() if isinstance(m, quantize.QuantizedLinear)]
    if any(m.weight.device.type == "cpu" for m in layers):
        cpu_kernels.warm_up()
    for m in layers:
        x = torch.zeros(1, m.in_features, dtype=dtype, device=m.weight.device)
        if m.kernel(x).startswith("torch-"):
            m(x)


@dataclass
class Placement:
    """Where and in which format every checkpoint tensor goes."""

    precision: str  # weight format of the block linears
    dtype: torch.dtype  # activations, KV cache and the other (float) weights
    layer_devices: list[torch.device]
    reason: str = ""

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}.get(self.precision, 0)

    @property
    def first(self) -> torch.device:
        return self.layer_devices[0]

    def device_of(self, name: str) -> torch.device:
        if name.startswith("transformer.layers."):
            return self.layer_devices[int(name.split(".")[2])]
        return self.first  # embedding (tied head), final LayerNorm, prefix encoder

    def convert(self, name: str, t: torch.Tensor) -> torch.Tensor:
        keep = not t.is_floating_point() or name.endswith(quantize.SCALE_SUFFIXES)
        return t.to(device=self.device_of(name), dtype=t.dtype if keep else self.dtype)


def plan_placement(cfg: ModelConfig, precision: str, device, devices, context: int,
                   compute_dtype=None) -> Placement:
    """Resolve "auto" precision/device and the per-layer devices."""
    from .devices import available_devices, choose_precision, plan_split

    names = devices.split(",") if isinstance(devices, str) else list(devices or [])
    devs = [resolve_device(d.strip()) for d in names] or [resolve_device(device)]
    reason = ""
    if precision == "auto":
        free = {d.name: d for d in available_devices()}
        key = str(devs[0]) if devs[0].index is not None or devs[0].type != "cuda" else "cuda:0"
        info = free.get(key) or free["cpu"]
        precision, reason = choose_precision(cfg, info, context, cfg.quantization_bit)
    if cfg.quantization_bit and precision != f"int{cfg.quantization_bit}":
        raise LocalGLMError(
            f"this checkpoint holds int{cfg.quantization_bit} weights; load it with "
            f"precision='int{cfg.quantization_bit}' (or 'auto'), or convert the float model")
    quantized = precision in ("int8", "int4")
    dtype = default_compute_dtype(devs[0], precision) if quantized else DTYPES[precision]
    if compute_dtype is not None:
        dtype = DTYPES[str(compute_dtype).removeprefix("torch.")]
    if len(devs) > 1:
        from .devices import Device

        free = {d.name: d for d in available_devices()}
        infos = [free.get(str(d), Device(str(d), 0)) for d in devs]
        layer_devices = [torch.device(n) for n in plan_split(infos, cfg, precision, context)]
    else:
        layer_devices = [devs[0]] * cfg.num_layers
    return Placement(precision, dtype, layer_devices, reason)


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
