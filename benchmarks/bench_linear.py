"""Time ChatGLM-6B's block linears: dense vs weight-only int8/int4 kernels (run by hand).

    python benchmarks/bench_linear.py [--threads 2] [--rows 1,32,256,1000] [--min-time 0.3]

For each full-size shape (in -> out) and each number of rows M (M = 1 is a decode step, larger
M is a prefill of M tokens) prints ms per call and the effective bandwidth
``weight bytes / time`` in GB/s. "Weight bytes" is what the method must read per call: the bf16
or fp32 matrix for dense, the stored int8/int4 bytes plus scales for every quantized method
(including the dequantize-then-GEMM ones, whose extra traffic is the point of comparison).
The machine's memory read bandwidth (sum over a 1 GiB tensor) is printed first for scale.

Weights are built directly in quantized form (random integers + scales), one shape at a time;
the dense baselines allocate one bf16 and one fp32 matrix for the current shape only.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from localglm import quantize as Q

# (name, in_features, out_features) of the four block linears of ChatGLM-6B.
SHAPES = (
    ("query_key_value", 4096, 12288),
    ("attention.dense", 4096, 4096),
    ("dense_h_to_4h", 4096, 16384),
    ("dense_4h_to_h", 16384, 4096),
)
INT4_GROUPS = (32, 64, 128)


def timeit(fn, min_time: float, max_reps: int = 50) -> float:
    """Best seconds per call over at least min_time, after a warm-up call.

    The minimum, not the mean: the machine may be shared, and other processes only ever make a
    call slower. A warm-up slower than 1 s counts as a sample (one-off costs are negligible
    there), which keeps the M = 1000 rows affordable.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    slow = first >= 1.0
    best, total, reps, min_reps = (first if slow else float("inf")), 0.0, 0, (1 if slow else 2)
    while reps < min_reps or (total < min_time and reps < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def memory_bandwidth(gib: float = 1.0) -> float:
    """GB/s of a streaming read: sum over a large float32 tensor."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)  # [n]
    s = timeit(x.sum, min_time=1.0)
    return x.numel() * 4 / s / 1e9


def random_int8(out_f: int, in_f: int) -> Q.QuantizedLinear:
    w = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)  # [out, in]
    scale = (torch.rand(out_f) * 1e-3 + 1e-4).half()  # [out]
    return Q.QuantizedLinear.from_official(w, scale, torch.randn(out_f).bfloat16(), bits=8)


def random_int4_official(out_f: int, in_f: int) -> Q.QuantizedLinear:
    q = torch.randint(-7, 8, (out_f, in_f), dtype=torch.int8)  # [out, in]
    scale = (torch.rand(out_f) * 1e-2 + 1e-3).half()  # [out]
    bias = torch.randn(out_f).bfloat16()
    return Q.QuantizedLinear.from_official(Q.pack_int4_official(q), scale, bias, bits=4)


def random_int4_grouped(out_f: int, in_f: int, group: int) -> Q.QuantizedLinear:
    m = Q.QuantizedLinear(in_f, out_f, 4, group, True, fmt="localglm", dtype=torch.bfloat16)
    m.weight.random_(0, 256)  # uint8 [out, in/2]: random nibbles
    m.weight_scale.uniform_(1e-3, 1e-2)  # [out, in/group]
    m.weight_zero.normal_(0, 1e-3)  # [out, in/group]
    m.bias.data.normal_()
    return m


def dequant_bf16_linear(layer: Q.QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """Dequantize to bf16, bf16 GEMM (forward_reference instead dequantizes to fp32 on CPU)."""
    return F.linear(x, layer.dequantize(torch.bfloat16), layer.bias)


def weight_bytes(m: Q.QuantizedLinear) -> int:
    n = m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * 2
    if m.group_size:
        n += m.weight_zero.numel() * 2
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,32,256,1000", help="comma-separated M values")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"memory read bandwidth (sum of 1 GiB fp32): {memory_bandwidth():.1f} GB/s\n")

    # results[(method, M)][shape] = (ms, GB/s)
    results: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    prep_ms: dict[str, dict[str, float]] = {}

    def record(method: str, shape: str, m_rows: int, sec: float, nbytes: int) -> None:
        results.setdefault((method, m_rows), {})[shape] = (sec * 1e3, nbytes / sec / 1e9)

    for shape, in_f, out_f in SHAPES:
        print(f"timing {shape} ({in_f} -> {out_f}) ...", flush=True)
        xs = {m: torch.randn(m, in_f, dtype=torch.bfloat16) for m in rows}  # [M, in]
        bias = torch.randn(out_f, dtype=torch.bfloat16)

        # Dense baselines, one matrix at a time.
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)  # [out, in]
        for m in rows:
            sec = timeit(partial(F.linear, xs[m], w, bias), args.min_time)
            record("dense bf16 F.linear", shape, m, sec, w.numel() * 2)
        w32 = w.float()  # [out, in]
        del w
        b32 = bias.float()
        for m in rows:
            sec = timeit(partial(F.linear, xs[m].float(), w32, b32), args.min_time)
            record("dense fp32 F.linear", shape, m, sec, w32.numel() * 4)
        del w32

        layers = {"int8 kernel": random_int8(out_f, in_f)}
        g_off = Q.OFFICIAL_INT4_KERNEL_GROUP  # per-row scales spread over groups of this size
        layers[f"int4 official kernel (g{g_off})"] = random_int4_official(out_f, in_f)
        for g in INT4_GROUPS:
            layers[f"int4 g{g} kernel"] = random_int4_grouped(out_f, in_f, g)
        for name, layer in layers.items():
            t0 = time.perf_counter()
            layer.prepare(torch.bfloat16)
            prep_ms.setdefault(name, {})[shape] = (time.perf_counter() - t0) * 1e3
            for m in rows:
                sec = timeit(partial(layer.forward_kernel, xs[m]), args.min_time)
                record(name, shape, m, sec, weight_bytes(layer))
            layer._kernel_cache.clear()  # free the kernel copy before the next layer

        # Dequantize every call, then a dense GEMM; the fp32 variant is forward_reference, what
        # forward() runs on CPU when no kernel is used.
        for name in ("int8 kernel", "int4 g128 kernel"):
            layer = layers[name]
            label = name.replace(" kernel", "")
            for m in rows:
                sec = timeit(partial(dequant_bf16_linear, layer, xs[m]), args.min_time)
                record(f"{label} dequant->bf16 + bf16 GEMM", shape, m, sec, weight_bytes(layer))
                sec = timeit(partial(layer.forward_reference, xs[m]), args.min_time)
                record(f"{label} dequant->fp32 + fp32 GEMM", shape, m, sec, weight_bytes(layer))
        del layers

    names = [s[0] for s in SHAPES]
    methods = list(dict.fromkeys(k[0] for k in results))
    width = 36
    for m in rows:
        print(
            f"\nM = {m} rows ({'decode' if m == 1 else 'prefill'}): ms per call (GB/s of weight "
            "bytes); block = sum of the four"
        )
        print(f"{'method':<{width}}" + "".join(f"{n:>20}" for n in names) + f"{'block ms':>11}")
        for meth in methods:
            r = results[(meth, m)]
            cells = "".join(f"{r[n][0]:>11.2f} ({r[n][1]:>5.1f})" for n in names)
            print(f"{meth:<{width}}{cells}{sum(r[n][0] for n in names):>11.1f}")
    print("\none-off kernel layout build (prepare) in ms:")
    for meth, d in prep_ms.items():
        print(f"{meth:<{width}}" + "".join(f"{d[n]:>20.1f}" for n in names))


if __name__ == "__main__":
    main()
