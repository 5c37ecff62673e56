"""`localglm bench`: load time, prefill and decode speed, peak memory and the bandwidth bound."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from ..errors import LocalGLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", choices=["chatglm-6b"],
                     help="build a full-size model with random weights directly in the "
                     "chosen format (no download, never holds fp32 weights)")
    src.add_argument("--model", metavar="DIR", help="benchmark a real model directory")
    p.add_argument("--precision", default="int4",
                   choices=["int4", "int8", "bfloat16", "float16", "float32"],
                   help="weight format (default: int4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 group size when quantizing (default: localglm's, 128)")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="activation dtype (default: the device's fastest)")
    p.add_argument("--prompts", default="32,256,1000",
                   help="prompt lengths to prefill, comma-separated (default: 32,256,1000); "
                   "decode is timed after the shortest and the longest")
    p.add_argument("--decode-tokens", type=int, default=16,
                   help="tokens to time per decode measurement (default: 16)")
    p.add_argument("--concurrency", default=None, metavar="N,N,...",
                   help="measure continuous batching instead: N streams at once for each N "
                   "(e.g. 1,2,4,8), prompts of the shortest --prompts length, --decode-tokens "
                   "each; then the worst gap a running stream sees while a prompt of the "
                   "longest --prompts length joins")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="with --concurrency: prompt tokens x layers / layers prefilled per "
                   "step while others decode (default: layers worth two decode steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--isa", choices=["native", "avx2"], default="native",
                   help="CPU code path: native (the best this CPU has) or avx2, to measure what "
                   "an AVX2-only CPU runs (PyTorch, oneDNN and the numba kernels alike)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _rerun_with_avx2() -> None:
    """PyTorch and numba choose their code path once, at import: start again with the AVX2
    environment set."""
    import os

    from ..quantize.cpu_kernels import AVX2_ENV

    env = {**os.environ, **AVX2_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "localglm.cli", *sys.argv[1:]], env)


def main(args: argparse.Namespace) -> int:
    import os

    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        _rerun_with_avx2()
    import torch

    from .. import bench
    from ..loader import DEFAULT_GROUP_SIZE, DTYPES, default_compute_dtype, load

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prompts = sorted(int(n) for n in args.prompts.split(","))
    except ValueError:
        raise LocalGLMError(
            f"--prompts must be comma-separated integers, not {args.prompts!r}") from None
    levels = _levels(args.concurrency) if args.concurrency else []
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    t = time.perf_counter()
    if args.synthetic:
        name = f"synthetic {args.synthetic}"
        dtype = (DTYPES[args.compute_dtype] if args.compute_dtype else
                 DTYPES.get(args.precision) or default_compute_dtype(torch.device("cpu")))
        log(f"building {name} in {args.precision} with random weights...")
        model = bench.synthetic_model(bench.CHATGLM_6B, args.precision, dtype,
                                      args.group_size or DEFAULT_GROUP_SIZE)
    else:
        name = args.model
        model = load(args.model, precision=args.precision, device="cpu",
                     compute_dtype=args.compute_dtype,
                     group_size=args.group_size or DEFAULT_GROUP_SIZE)
        dtype = model.dtype
    load_s = time.perf_counter() - t
    if args.concurrency:
        from ..bench_batch import print_table as print_batch
        from ..bench_batch import run as run_batch

        m = getattr(model, "model", model)
        join = prompts[-1] if len(prompts) > 1 else 0
        res = run_batch(m, dtype, levels, prompts[0], args.decode_tokens, join,
                        args.prefill_tokens, log=log)
        if args.json:
            print(json.dumps({"model": name, "precision": args.precision, "load_s": load_s,
                              **asdict(res)}, indent=2))
        else:
            print_batch(res)
        return 0
    res = bench.run(model, name, args.precision, dtype, load_s, prompts, args.decode_tokens,
                    log=log)
    if args.json:
        out = dict(vars(res))
        out["roofline_fraction"] = res.roofline_fraction
        out["peak_rss_gb"] = res.peak_rss_gb
        print(json.dumps(out, indent=2))
    else:
        print_table(res)
    return 0


def _levels(text: str) -> list[int]:
    try:
        levels = [int(n) for n in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise LocalGLMError(f"--concurrency must be comma-separated counts >= 1 (e.g. 1,2,4,8), "
                            f"not {text!r}")
    return levels


def print_table(r) -> None:
    print(f"\n{r.model}: {r.precision} weights, {r.compute_dtype} activations, "
          f"{r.threads} threads; {r.isa}")
    for shape, kernel in r.kernels.items():
        print(f"  {shape}: {kernel}")
    rows = [("load", f"{r.load_s:.1f} s"),
            ("weights read per token", f"{r.weight_bytes / 2**30:.2f} GiB")]
    rows += [(f"prefill {n} tokens", f"{v:.1f} tokens/s")
             for n, v in r.prefill_tokens_per_s.items()]
    rows += [("decode, short prompt", f"{r.decode_ms_per_token:.0f} ms/token"),
             ("  of which quantized linears + head", f"{r.linear_ms_per_token:.0f} ms"),
             ("  everything else", f"{r.other_ms_per_token:.0f} ms"),
             ("decode with the chat sampler", f"{r.decode_ms_per_token_sampled:.0f} ms/token"),
             ("  the sampler alone", f"{r.sampler_ms_per_token:.2f} ms/token"),
             (f"decode, after {r.long_context} tokens",
              f"{r.decode_ms_per_token_long:.0f} ms/token"),
             ("memory read bandwidth", f"{r.bandwidth_gbs:.1f} GB/s"),
             ("roofline (weights / bandwidth)", f"{r.roofline_ms_per_token:.0f} ms/token"),
             ("decode vs roofline", f"{100 * r.roofline_fraction:.0f} %"),
             ("peak RSS", f"{r.peak_rss_gb:.2f} GB ({r.peak_rss_mb:.0f} MiB)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
