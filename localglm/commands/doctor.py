"""`localglm doctor`: this machine, what each precision needs, what localglm would pick, and
every problem of a model directory (checked without loading it)."""

from __future__ import annotations

import argparse
import platform

from ..devices import (
    GiB,
    available_devices,
    choose_precision,
    fmt_bytes,
    needed_bytes,
    plan_split,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model directory to check without loading it (every problem is "
                   "listed; exit code 1 if there is one) and to plan for (default: the real "
                   "ChatGLM-6B shapes)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of KV cache to plan for (default: the model's maximum, 2048 "
                   "for ChatGLM-6B)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to split the layers over, e.g. cuda:0,cuda:1")


def cpu_features() -> str:
    import torch

    from ..quantize.linear import cpu_flags

    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        cap = "unknown"
    flags = cpu_flags()
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
              "amx_int8"]
    have = [f for f in wanted if f in flags]
    return f"{cap} ({', '.join(have) or 'flags unknown'})"


def quantized_kernels() -> str:
    """What the quantized layers run on this CPU, for a token and for a prompt."""
    from ..quantize import cpu_kernels
    from ..quantize.linear import cpu_has_bf16_gemm

    isa = cpu_kernels.isa()
    if isa is None:
        return ("PyTorch's int4/int8 kernels (bf16 activations; the numba kernels need numba "
                "and an AVX2 CPU)")
    gemm = "bf16 (AMX/AVX512-BF16)" if cpu_has_bf16_gemm() else "float32"
    return (f"numba {isa} kernels for tokens, dequantized tiles + {gemm} GEMM for prompts")


def main(args: argparse.Namespace) -> int:
    import torch

    from ..config import ModelConfig
    from ..weights import check_model_dir, resolve_model_path

    cfg = ModelConfig()
    source = "ChatGLM-6B (real shapes)"
    report = None
    if args.model:
        report = check_model_dir(resolve_model_path(args.model))
        cfg = report.config
        source = str(report.model_dir)
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"cpu: {platform.processor() or platform.machine()}, kernels: {cpu_features()}")
    print(f"int8/int4 on the cpu: {quantized_kernels()}")
    devices = available_devices()
    for d in devices:
        print(f"device {d.name}: {d.free_bytes / GiB:.1f} GiB free of {d.total_bytes / GiB:.1f}")
    if cfg is not None:
        _print_memory(cfg, source, args.max_context or cfg.max_sequence_length)
    if report is not None and report.problems:
        print_problems(report)
        return 1
    if report is not None:
        print(f"\nmodel {source}: config.json, tokenizer and {len(report.files)} weight "
              f"file(s) ({len(report.tensors)} tensors) check out")
    context = args.max_context or cfg.max_sequence_length
    best = devices[0]
    precision, why = choose_precision(cfg, best, context, cfg.quantization_bit)
    print(f"\nlocalglm picks: {precision} on {best.name}: {why}")
    if args.devices:
        chosen = [d for d in devices if d.name in args.devices.split(",")]
        plan = plan_split(chosen, cfg, precision, context)
        for d in chosen:
            print(f"  {d.name}: {plan.count(d.name)} layers")
    return 0


def _print_memory(cfg, source: str, context: int) -> None:
    print(f"\nmemory for {source}, {context}-token context:")
    for p in ("float32", "float16", "int8", "int4"):
        print(f"  {p:8s} {fmt_bytes(needed_bytes(cfg, p, context)):>11s}")


def print_problems(report) -> None:
    """Every problem of a model directory, one line each, and that nothing can be picked."""
    n = len(report.problems)
    print(f"\nmodel {report.model_dir}: {n} problem{'s' if n > 1 else ''}; localglm cannot "
          "load it until {} fixed:".format("they are" if n > 1 else "it is"))
    for p in report.problems:
        print(f"  {p}")
