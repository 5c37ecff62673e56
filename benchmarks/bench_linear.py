"""Time ChatGLM-6B's block linears and head: dense vs weight-only int8/int4 (run by hand).

    python benchmarks/bench_linear.py [--threads 2] [--rows 1,32,256,1000] [--min-time 0.3]

For each full-size shape (in -> out) and each number of rows M (M = 1 is a decode step, larger
M is a prefill of M tokens) prints ms per call and the effective bandwidth
``weight bytes / time`` in GB/s. "Weight bytes" is what the method must read per call: the bf16
or fp32 matrix for dense, the stored int8/int4 bytes plus scales for every quantized method
(including the dequantize-then-GEMM ones, whose extra traffic is the point of comparison).
The machine's memory read bandwidth (sum over a 1 GiB tensor) is measured before each shape, in
the same run, and every quantized method's GB/s is also shown as a share of it. "localglm" is
what QuantizedLinear.forward runs (the numba kernels up to 16 rows, dequantized tiles + GEMM
above); "PyTorch kernel" is _weight_int4pack_mm / _weight_int8pack_mm on the same weights.

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
    ("lm_head", 4096, 130528),
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
    m = Q.QuantizedLinear(in_f, out_f, 8, 0, True, fmt="official", dtype=torch.bfloat16)
    m.weight.random_(-127, 128)  # int8 [out, in]
    m.weight_scale.uniform_(1e-4, 1e-3)  # fp16 [out]
    m.bias.data.normal_()
    return m


def random_int4_official(out_f: int, in_f: int) -> Q.QuantizedLinear:
    m = Q.QuantizedLinear(in_f, out_f, 4, 0, True, fmt="official", dtype=torch.bfloat16)
    m.weight.random_(-128, 128)  # int8 [out, in/2]: two signed nibbles per byte
    m.weight_scale.uniform_(1e-3, 1e-2)  # fp16 [out]
    m.bias.data.normal_()
    return m


def random_int4_grouped(out_f: int, in_f: int, group: int) -> Q.QuantizedLinear:
    m = Q.QuantizedLinear(in_f, out_f, 4, group, True, fmt="localglm", dtype=torch.bfloat16)
    m.weight.random_(0, 256)  # uint8 [out, in/2]: random nibbles
    m.weight_scale.uniform_(1e-3, 1e-2)  # [out, in/group]
    m.weight_zero.normal_(0, 1e-3)  # [out, in/group]
    m.bias.data.normal_()
    return m


def torch_kernel(layer: Q.QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return layer._forward_torch(x, f"torch-int{layer.bits}")


def weight_bytes(m: Q.QuantizedLinear) -> int:
    n = m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * 2
    if m.group_size:
        n += m.weight_zero.numel() * 2
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,32,256", help="comma-separated M values")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    from localglm.quantize import cpu_kernels

    print(f"numba kernels: {cpu_kernels.isa()}\n")

    # results[(method, M)][shape] = (ms, GB/s)
    results: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    probe: dict[str, float] = {}

    def record(method: str, shape: str, m_rows: int, sec: float, nbytes: int) -> None:
        results.setdefault((method, m_rows), {})[shape] = (sec * 1e3, nbytes / sec / 1e9)

    for shape, in_f, out_f in SHAPES:
        print(f"timing {shape} ({in_f} -> {out_f}) ...", flush=True)
        probe[shape] = memory_bandwidth()
        xs = {m: torch.randn(m, in_f, dtype=torch.bfloat16) for m in rows}  # [M, in]
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)  # [out, in]
        for m in rows:
            sec = timeit(partial(F.linear, xs[m], w), args.min_time)
            record("dense bf16 F.linear", shape, m, sec, w.numel() * 2)
        del w
        layers = {"int8": random_int8(out_f, in_f),
                  "int4 official": random_int4_official(out_f, in_f)}
        for g in INT4_GROUPS:
            layers[f"int4 g{g}"] = random_int4_grouped(out_f, in_f, g)
        for name, layer in layers.items():
            with torch.inference_mode():
                for m in rows:
                    sec = timeit(partial(layer, xs[m]), args.min_time)
                    record(f"localglm {name}", shape, m, sec, weight_bytes(layer))
                if name in ("int8", "int4 g128") and max(rows) <= 256:
                    for m in rows:
                        sec = timeit(partial(torch_kernel, layer, xs[m]), args.min_time)
                        record(f"PyTorch kernel {name}", shape, m, sec, weight_bytes(layer))
                    layer._torch_cache.clear()  # free the kernel copy before the next layer
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
    print("\nmemory read bandwidth measured before each shape (GB/s): "
          + ", ".join(f"{n} {probe[n]:.1f}" for n in names))
    print("decode (M = 1) share of that bandwidth:")
    for meth in methods:
        if (meth, 1) in results and not meth.startswith("dense"):
            r = results[(meth, 1)]
            print(f"  {meth:<{width - 2}}" + "".join(
                f"{100 * r[n][1] / probe[n]:>19.0f}%" for n in names))


if __name__ == "__main__":
    main()
