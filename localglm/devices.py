"""What memory a model needs, what this machine has, and how to place the model on it.

Everything here except ``available_devices`` is a pure function, so placement decisions are
tested with made-up machines.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .errors import LocalGLMError

GiB = 1 << 30
# Bits per weight of the block linears, including scales (group size 32 for int4 by default).
WEIGHT_BITS = {"float32": 32, "bfloat16": 16, "float16": 16, "int8": 8 + 16 / 4096,
               "int4": 4 + 2 * 16 / 32}
# Preference order for precision="auto": the most precise that fits with headroom.
AUTO_ORDER = ("float16", "int8", "int4")
HEADROOM = 0.9  # plan to use at most this fraction of free memory (activations, fragmentation)


def fmt_bytes(n: float) -> str:
    """Human-readable size: GiB for model-sized numbers, MiB for small ones."""
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.1f} MiB"


@dataclass
class Device:
    name: str  # "cpu", "cuda:0", "mps"
    free_bytes: int  # memory available to the model on this device
    total_bytes: int = 0


def available_devices() -> list[Device]:
    """Devices PyTorch can use here with their free memory (GPUs first)."""
    import psutil
    import torch

    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(Device(f"cuda:{i}", free, total))
    vm = psutil.virtual_memory()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append(Device("mps", vm.available, vm.total))  # unified memory
    out.append(Device("cpu", vm.available, vm.total))
    return out


def layer_params(cfg: ModelConfig) -> tuple[int, int]:
    """(weights in the four quantizable linears, other params) of one block."""
    h, inner = cfg.hidden_size, cfg.inner_hidden_size
    linear = 3 * h * h + h * h + 2 * h * inner
    other = 3 * h + h + inner + h + 4 * h  # biases and two LayerNorms
    return linear, other


def model_bytes(cfg: ModelConfig, precision: str) -> dict[str, int]:
    """Bytes of the weights: per block, the (tied) embedding, and in total."""
    float_bytes = 4 if precision == "float32" else 2
    linear, other = layer_params(cfg)
    per_layer = int(linear * WEIGHT_BITS[precision] / 8) + other * float_bytes
    embed = cfg.vocab_size * cfg.hidden_size * float_bytes + 2 * cfg.hidden_size * float_bytes
    return {"layer": per_layer, "embedding": embed, "total": per_layer * cfg.num_layers + embed}


def kv_cache_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    return 2 * cfg.num_layers * cfg.hidden_size * dtype_bytes * tokens


def needed_bytes(cfg: ModelConfig, precision: str, context: int) -> int:
    act = 4 if precision == "float32" else 2
    return model_bytes(cfg, precision)["total"] + kv_cache_bytes(cfg, context, act)


def choose_precision(cfg: ModelConfig, device: Device, context: int,
                     checkpoint_bits: int = 0) -> tuple[str, str]:
    """(precision, reason): the most precise that fits ``device`` with headroom.

    A pre-quantized checkpoint cannot be made more precise, so only it or lower is considered.
    The 16-bit float format is bfloat16 on CPUs (their fast 16-bit type), float16 elsewhere.
    """
    half = "bfloat16" if device.name == "cpu" else "float16"
    order = [half if p == "float16" else p for p in AUTO_ORDER]
    if checkpoint_bits == 8:
        order = ["int8", "int4"]
    elif checkpoint_bits == 4:
        order = ["int4"]
    budget = device.free_bytes * HEADROOM
    for p in order:
        need = needed_bytes(cfg, p, context)
        if need <= budget:
            return p, (f"{p} needs {fmt_bytes(need)} (weights + KV cache for {context} "
                       f"tokens); {device.name} has {fmt_bytes(device.free_bytes)} free")
    p = order[-1]
    need = needed_bytes(cfg, p, context)
    return p, (f"even {p} needs {fmt_bytes(need)} and {device.name} has only "
               f"{fmt_bytes(device.free_bytes)} free: expect swapping, or use a smaller "
               "--max-context")


def plan_split(devices: list[Device], cfg: ModelConfig, precision: str,
               context: int) -> list[str]:
    """Device of every block, in proportion to each device's free memory.

    The embedding (tied to the output head) and the final LayerNorm sit on the first device,
    whose budget is reduced accordingly; each block's KV cache lives with the block, so only
    the hidden state (a few KB per token) moves between devices.
    """
    if not devices:
        raise LocalGLMError("no devices to place the model on")
    sizes = model_bytes(cfg, precision)
    act = 4 if precision == "float32" else 2
    per_layer = sizes["layer"] + kv_cache_bytes(cfg, context, act) // cfg.num_layers
    room = [d.free_bytes * HEADROOM for d in devices]
    room[0] -= sizes["embedding"]
    if room[0] < 0:
        raise LocalGLMError(f"{devices[0].name} cannot even hold the embedding "
                            f"({sizes['embedding'] / GiB:.1f} GiB)")
    capacity = [int(r // per_layer) for r in room]
    if sum(capacity) < cfg.num_layers:
        need = (per_layer * cfg.num_layers + sizes["embedding"]) / GiB
        have = sum(d.free_bytes for d in devices) * HEADROOM / GiB
        raise LocalGLMError(f"{precision} needs {need:.1f} GiB; these devices have "
                            f"{have:.1f} GiB usable: choose a lower precision")
    # Proportional shares, then largest remainders, never above a device's capacity.
    total = sum(room)
    share = [cfg.num_layers * r / total for r in room]
    counts = [min(int(s), c) for s, c in zip(share, capacity, strict=True)]
    while sum(counts) < cfg.num_layers:
        i = max((i for i in range(len(devices)) if counts[i] < capacity[i]),
                key=lambda i: share[i] - counts[i])
        counts[i] += 1
    return [d.name for d, n in zip(devices, counts, strict=True) for _ in range(n)]
