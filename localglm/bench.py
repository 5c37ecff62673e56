"""Speed and memory measurements: synthetic full-size models, prefill/decode timing, bandwidth.

Used by ``localglm bench``; nothing here runs in the unit tests except on tiny shapes.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field

import psutil
import torch

from . import malloc, quantize, weights
from .config import ModelConfig
from .engine import LocalGLM
from .generate import Batch, decode_one_token, new_cache, prefill
from .loader import DEFAULT_GROUP_SIZE, prepare_kernels
from .model import ChatGLMModel, RotaryTable, skeleton
from .quantize.embedding import use_quantized_head

CHATGLM_6B = ModelConfig()  # the real shapes: vocab 130528, hidden 4096, 28 layers, inner 16384


@dataclass
class BenchResult:
    model: str
    precision: str
    compute_dtype: str
    threads: int
    load_s: float = 0.0
    weight_bytes: int = 0
    prefill_tokens_per_s: dict[str, float] = field(default_factory=dict)
    decode_ms_per_token: float = 0.0
    decode_ms_per_token_long: float = 0.0
    long_context: int = 0
    peak_rss_mb: float = 0.0  # MiB (2**20 bytes), the unit of /proc's VmHWM / 1024
    bandwidth_gbs: float = 0.0
    roofline_ms_per_token: float = 0.0
    # decode after the short prompt with the chat sampler (temperature 0.95, top_p 0.7)
    decode_ms_per_token_sampled: float = 0.0
    sampler_ms_per_token: float = 0.0  # the sampler alone on 130k-wide logits
    linear_ms_per_token: float = 0.0  # of a greedy decode step: quantized linears + head
    other_ms_per_token: float = 0.0  # everything else: attention, norms, Python
    kernels: dict[str, str] = field(default_factory=dict)  # layer shape -> kernel it runs
    isa: str = ""  # the CPU code path: PyTorch capability / numba kernels

    @property
    def peak_rss_gb(self) -> float:
        """The peak in GB of 1e9 bytes, the unit chatglm.cpp's bench reports."""
        return self.peak_rss_mb * 2**20 / 1e9

    @property
    def roofline_fraction(self) -> float:
        if not self.decode_ms_per_token:
            return 0.0
        return self.roofline_ms_per_token / self.decode_ms_per_token


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux: VmHWM), else the current RSS."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: summing a buffer much larger than the caches."""
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    n = x.numel() * 4
    del x
    gc.collect()
    return n / best / 1e9


def decode_bytes_per_token(model: ChatGLMModel) -> int:
    """Bytes of weights read for one decoded token: every block, the final LN and the head.

    The embedding lookup reads one row, so the tied matrix counts once (as the head).
    """
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            total += t.numel() * t.element_size()
    total -= model.rotary.cos.numel() * 4 * 2  # lookup tables, one row read per token
    return total


def synthetic_model(cfg: ModelConfig, precision: str, dtype: torch.dtype,
                    group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0) -> ChatGLMModel:
    """A model of ``cfg``'s shapes with random weights, built layer by layer.

    Quantized formats are filled directly with random integers and scales, so no full-size
    float copy of the block weights ever exists.
    """
    g = torch.Generator().manual_seed(seed)
    model = skeleton(cfg)
    if precision in ("int8", "int4"):
        bits = 8 if precision == "int8" else 4
        group_size = group_size if bits == 4 else 0
        quantize.make_quantized_skeleton(model, bits, group_size,
                                         "localglm" if group_size else "official")
        if dtype != torch.float32:  # as the loader does on the CPU
            use_quantized_head(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rotary."):
            continue
        value = _random_like(t, name, dtype, g)
        weights.assign(model, name, value)
    model.rotary = RotaryTable(cfg.head_dim // 2, cfg.max_sequence_length)
    prepare_kernels(model, dtype)
    malloc.return_large_blocks()  # as the loader does on the CPU
    return model.eval()


def _random_like(t: torch.Tensor, name: str, dtype, g) -> torch.Tensor:
    if t.dtype in (torch.int8, torch.uint8):
        lo, hi = (-127, 128) if t.dtype == torch.int8 else (0, 256)
        return torch.randint(lo, hi, t.shape, dtype=t.dtype, generator=g)
    if name.endswith(quantize.SCALE_SUFFIXES):  # keeps its stored dtype
        return torch.empty(t.shape, dtype=t.dtype).normal_(0, 1e-3, generator=g)
    if name.endswith("layernorm.weight"):
        return torch.ones(t.shape, dtype=dtype)
    return torch.empty(t.shape, dtype=dtype).normal_(0, 0.02, generator=g)


def _prompt(cfg: ModelConfig, n: int) -> list[int]:
    """An ``n``-token chat prompt: ordinary ids, then [gMASK] <sop>."""
    return [5 + (i * 7919) % 1000 for i in range(n - 2)] + [cfg.gmask_token_id,
                                                            cfg.bos_token_id]


@torch.inference_mode()
def prefill_and_decode(model: ChatGLMModel, n: int, steps: int, dtype, sampler=None,
                       decode_scope=None) -> tuple[float, float]:
    """(prefill tokens/s of an ``n``-token prompt, ms per decoded token after it).

    ``sampler`` ((1, V) logits -> (1,) ids) picks each token; greedy when None.
    ``decode_scope``: a context manager entered around the timed decode steps only.
    """
    pick = sampler or (lambda logits: logits.argmax(-1))
    batch = Batch([_prompt(model.config, n)], model.config, "cpu")
    cache = new_cache(model, 1, n + steps + 2, dtype)
    t = time.perf_counter()
    logits = prefill(model, batch, cache, dtype)
    prefill_s = time.perf_counter() - t
    index = batch.width
    token = pick(logits)[:, None]
    decode_one_token(model, batch, token, index, cache)  # warm-up step, not timed
    index += 1
    with decode_scope or contextlib.nullcontext():
        t = time.perf_counter()
        for _ in range(steps):
            token = pick(decode_one_token(model, batch, token, index, cache))[:, None]
            index += 1
        decode_s = time.perf_counter() - t
    return n / prefill_s, decode_s / max(steps, 1) * 1000


def chat_sampler():
    """The chat defaults' sampler (temperature 0.95, top_p 0.7), seeded."""
    from .sampling import make_sampler

    return make_sampler(0.95, 0.7, generator=torch.Generator().manual_seed(0))


def time_sampler(vocab: int, repeats: int = 20) -> float:
    """ms per call of the chat sampler on one row of realistic (peaked) logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, vocab, generator=g) * 2
    logits[0, torch.randperm(vocab, generator=g)[:50]] += 12
    sample = chat_sampler()
    sample(logits)
    t = time.perf_counter()
    for _ in range(repeats):
        sample(logits)
    return (time.perf_counter() - t) / repeats * 1000


@torch.inference_mode()
def linear_share(model: ChatGLMModel, dtype, steps: int = 4) -> tuple[float, float]:
    """(ms in the quantized linears and head, ms in everything else) per greedy decode step
    after a short prompt, timed by wrapping every quantized layer's forward during the
    decode steps only."""
    spent, on = [0.0], [False]

    def timed(forward):
        def wrapper(*args, **kwargs):
            if not on[0]:
                return forward(*args, **kwargs)
            t = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    @contextlib.contextmanager
    def timing():
        on[0] = True
        try:
            yield
        finally:
            on[0] = False

    layers = [m for m in model.modules() if isinstance(m, quantize.QuantizedLinear)]
    for m in layers:
        m._forward_no_grad = timed(m._forward_no_grad)
    try:
        _, total_ms = prefill_and_decode(model, 8, steps, dtype, decode_scope=timing())
    finally:
        for m in layers:
            del m._forward_no_grad
    linear_ms = spent[0] / steps * 1000
    return linear_ms, max(total_ms - linear_ms, 0.0)


def isa_description() -> str:
    from .quantize import cpu_kernels

    return (f"PyTorch {torch.backends.cpu.get_cpu_capability()}, "
            f"numba kernels {cpu_kernels.isa() or 'unavailable'}")


def run(model: ChatGLMModel | LocalGLM, name: str, precision: str, dtype, load_s: float,
        prompts=(32, 256, 1000), decode_steps: int = 16, log=print) -> BenchResult:
    """Prefill each prompt length, decode after the shortest and the longest prompt."""
    m = model.model if isinstance(model, LocalGLM) else model
    res = BenchResult(name, precision, str(dtype).removeprefix("torch."),
                      torch.get_num_threads(), load_s=load_s)
    res.weight_bytes = decode_bytes_per_token(m)
    res.isa = isa_description()
    res.kernels = quantize.kernel_report(m, dtype, rows=(1, max(prompts)))
    prefill_and_decode(m, 8, 1, dtype)  # first-call overheads out of the way
    prompts = sorted(prompts)
    for n in prompts:
        steps = decode_steps if n in (prompts[0], prompts[-1]) else 0
        log(f"prefill {n} tokens" + (f", then decode {steps}" if steps else "") + "...")
        tps, ms = prefill_and_decode(m, n, steps, dtype)
        res.prefill_tokens_per_s[str(n)] = tps
        if n == prompts[0]:
            res.decode_ms_per_token = ms
        if n == prompts[-1]:
            res.decode_ms_per_token_long, res.long_context = ms, n
    log("decode with the chat sampler...")
    _, res.decode_ms_per_token_sampled = prefill_and_decode(m, prompts[0], decode_steps, dtype,
                                                            chat_sampler())
    res.sampler_ms_per_token = time_sampler(m.config.vocab_size)
    res.linear_ms_per_token, res.other_ms_per_token = linear_share(m, dtype)
    res.peak_rss_mb = peak_rss_mb()
    res.bandwidth_gbs = measure_bandwidth()
    res.roofline_ms_per_token = res.weight_bytes / (res.bandwidth_gbs * 1e9) * 1000
    return res
