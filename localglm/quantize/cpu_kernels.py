"""Weight-only int4/int8 matrix products on the CPU, compiled by numba (no C compiler needed).

Activations are quantized to int8 in blocks of 32-128 columns (one scale per block, like ggml's
q8_0), so the inner loop is an integer multiply-add: ``vpdpbusd`` where the CPU has AVX-VNNI or
AVX512-VNNI, ``vpmaddubsw`` + ``vpmaddwd`` on plain AVX2. The kernels read the stored weights as
they are -- no repacked copy:

* official int4 (THUDM): byte j of a row holds column 2j (high nibble) and 2j+1 (low nibble),
  signed; localglm int4 is the same layout with unsigned nibbles. One 32-byte load covers 64
  columns: its high nibbles are the 32 even columns and its low nibbles the 32 odd ones, so the
  activations are permuted once per call (even columns, then odd ones, per 64) to match.
* int8: plain rows; the sign of each weight is moved onto the activation (``vpsignb``) so that
  the unsigned x signed multiply of both instruction sets applies without saturation.

For a block of activation columns with int8 values ``a`` and scale ``d`` and a weight group
``(q - c) * s + z`` the contribution is ``d * (s * sum(q a) + (z - c s) * sum(a))``: the integer
dot product plus a per-block correction from the activation sums, so the asymmetric format
stays exact with respect to the quantized activations.

Vector code is emitted as LLVM IR through ``numba.extending.intrinsic`` because numba widens
integer arithmetic to 64 bits and LLVM then cannot vectorise plain loops well. The instruction
set is the one numba compiles for (``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` override it, so the
AVX2 code can run on an AVX-512 machine).
"""

from __future__ import annotations

import os

import numpy as np
import torch


def _cache_dir() -> str:
    """Compiled kernels go to the user's cache (keyed to this CPU by numba), never into
    site-packages."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "localglm", "numba")


os.environ.setdefault("NUMBA_CACHE_DIR", _cache_dir())
# numba's OpenMP layer: its calling thread works too (the workqueue layer's waits beside two
# busy workers, 3 threads on 2 cores: measured 9 vs 11-13 GB/s on a 2-core machine). Its
# threads, like PyTorch's, sleep between regions under OMP_WAIT_POLICY=PASSIVE, which
# localglm sets before torch loads. (Set before numba reads its config.)
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")

try:  # numba is a dependency, but the reference path must work without it
    import llvmlite.binding as _llvm
    from llvmlite import ir
    from numba import config as _nb_config
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only on installs without numba
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "isa", "matmul_int4", "matmul_int8", "shape_ok", "supported", "warm_up"]

# Activation columns per int8 scale for the per-row formats and wide groups.
BLOCK = 128
# The environment that makes PyTorch, oneDNN and numba run their AVX2 code on any newer x86
# CPU (read once at start-up, so it must be set before the process imports them): what an
# AVX2 + FMA CPU (Haswell and later, Zen 1-3) offers, no AVX-512, no VNNI.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c,+popcnt,+sse4.2,+bmi,+bmi2,+cx16,+movbe,+lzcnt",
}


def _target_features() -> set[str]:
    """The features numba compiles for: NUMBA_CPU_FEATURES if set, else the host's."""
    env = os.environ.get("NUMBA_CPU_FEATURES") or getattr(_nb_config, "CPU_FEATURES", None)
    if env:
        return {f[1:] for f in env.split(",") if f.startswith("+")}
    return {k for k, v in _llvm.get_host_cpu_features().items() if v}


if HAVE_NUMBA:
    _FEATURES = _target_features()
    _HAS_AVX2 = "avx2" in _FEATURES
    _VNNI = ("avx512vnni" in _FEATURES and "avx512vl" in _FEATURES) or "avxvnni" in _FEATURES
else:
    _FEATURES, _HAS_AVX2, _VNNI = set(), False, False
# The int8 kernel with VNNI multiplies w + 128 (unsigned) and subtracts 128 * sum(x) after.
INT8_OFFSET = 128 if _VNNI else 0


def isa() -> str | None:
    """Name of the code path the kernels compile to ('avx512-vnni', 'avx-vnni', 'avx2'), or
    None when they cannot run here (no numba, or a CPU without AVX2)."""
    if not (HAVE_NUMBA and _HAS_AVX2):
        return None
    if _VNNI:
        return "avx512-vnni" if "avx512vnni" in _FEATURES else "avx-vnni"
    return "avx2"


def supported() -> bool:
    return isa() is not None


if HAVE_NUMBA:
    _I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    _F32 = ir.FloatType()
    _V32I8 = ir.VectorType(_I8, 32)
    _V16I16 = ir.VectorType(_I16, 16)
    _V8I32 = ir.VectorType(_I32, 8)
    _V8F32 = ir.VectorType(_F32, 8)

    def _fn(builder, name, ret, args):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)

    def _dot(builder, a_u8, b_s8, acc):
        """acc (8 x i32) += sums of 4 adjacent products of unsigned a and signed b bytes."""
        if _VNNI:
            f = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32] * 3)
            return builder.call(
                f, [acc, builder.bitcast(a_u8, _V8I32), builder.bitcast(b_s8, _V8I32)])
        # a <= 255 only for int8 weights, whose sign moved to b (|a|,|b| <= 127): pairs of
        # products stay inside int16, so vpmaddubsw never saturates.
        f1 = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
        f2 = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
        p = builder.call(f1, [a_u8, b_s8])
        return builder.add(acc, builder.call(f2, [p, ir.Constant(_V16I16, [1] * 16)]))

    def _splat(builder, x, lanes):
        vt = ir.VectorType(x.type, lanes)
        v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(_I32, 0))
        mask = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
        return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), mask)

    def _ptr(builder, addr, t):
        return builder.inttoptr(addr, t.as_pointer())

    def _nibbles(builder, w, xor):
        """Unsigned high and low nibbles of 32 bytes (after an optional XOR 0x88 that turns
        signed nibbles s into s + 8; None: no XOR)."""
        if xor is not None:
            w = builder.xor(w, builder.bitcast(_splat(builder, xor, 32), _V32I8))
        lo = builder.and_(w, ir.Constant(_V32I8, [15] * 32))
        hi = builder.lshr(w, ir.Constant(_V32I8, [4] * 32))
        return hi, lo

    def _fma(builder, a, b, c):
        f = _fn(builder, "llvm.fma.v8f32", _V8F32, [_V8F32] * 3)
        return builder.call(f, [a, b, c])

    def _hsum(builder, v):
        f = _fn(builder, "llvm.vector.reduce.fadd.v8f32", _F32, [_F32, _V8F32])
        return builder.call(f, [ir.Constant(_F32, 0.0), v])

    def _chunk_dots(builder, wp, xp, c, xor, acc_h, acc_l):
        """Chunk c (32 bytes of w, 64 columns): its high nibbles dotted with the activations
        at x + 64c, its low nibbles with those at x + 64c + 32, added to acc_h and acc_l."""
        hi, lo = _nibbles(builder, builder.load(builder.gep(wp, [c]), align=1), xor)
        c2 = builder.shl(c, ir.Constant(_I64, 1))
        xh = builder.load(builder.gep(xp, [c2]), align=1)
        xl = builder.load(builder.gep(xp, [builder.add(c2, ir.Constant(_I64, 1))]), align=1)
        return _dot(builder, hi, xh, acc_h), _dot(builder, lo, xl, acc_l)

    def _bf16_value(builder, bits):
        """float32 value of bfloat16 bits (i16): they are its upper half."""
        u = builder.zext(bits, _I32)
        return builder.bitcast(builder.shl(u, ir.Constant(_I32, 16)), _F32)

    def _load_bf16(builder, ptr, idx):
        """float32 value of the bfloat16 bits at ptr[idx] (ptr: i16*)."""
        return _bf16_value(builder, builder.load(builder.gep(ptr, [idx])))

    @intrinsic
    def _int4_row_halves(typingctx, w_addr, x_addr, f_addr, nchunks, xor):
        """int4 nibbles with one factor per 32 columns (groups of 32): in a chunk,
        bytes 0-15 (i32 lanes 0-3) hold columns 0-31 and bytes 16-31 columns 32-63."""
        sig = types.float32(types.uint64, types.uint64, types.uint64, types.int64, types.uint8)

        def codegen(context, builder, signature, args):
            w_a, x_a, f_a, nc, xor_ = args
            wp, xp = _ptr(builder, w_a, _V32I8), _ptr(builder, x_a, _V32I8)
            fp = _ptr(builder, f_a, ir.VectorType(_F32, 2))
            accf = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
            lanes = ir.Constant(ir.VectorType(_I32, 8), [0, 0, 0, 0, 1, 1, 1, 1])
            with cgutils.for_range(builder, nc) as lc:
                c = lc.index
                zero = ir.Constant(_V8I32, [0] * 8)
                h, lo = _chunk_dots(builder, wp, xp, c, xor_, zero, zero)
                tot = builder.add(h, lo)
                f2 = builder.load(builder.gep(fp, [c]), align=4)
                f = builder.shuffle_vector(f2, ir.Constant(f2.type, ir.Undefined), lanes)
                builder.store(_fma(builder, builder.sitofp(tot, _V8F32), f,
                                   builder.load(accf)), accf)
            return _hsum(builder, builder.load(accf))

        return sig, codegen

    # Activation rows one kernel call takes: each weight chunk is loaded and unpacked once,
    # then multiplied with every row (batched decode reads the weights once per step).
    MAX_ROWS = 4
    _ONES16 = ir.Constant(_V16I16, [1] * 16)

    def _rows_kernel(kind: str, rows: int):
        """An intrinsic that computes ``rows`` activation rows' dot products with one weight row,
        block by block, and stores them (float32) at y[0 .. rows-1].

        kind "grouped": localglm int4 whose groups are the activation blocks (64/128 columns):
          y = sum_b dx_b s_b dot_b + (z_b - 8 s_b) xs_b, scale and zero read with the nibbles.
        kind "int4": int4 nibbles (xor 0x88 for signed ones), y = sum_b f_b dot_b with the
          factors f [rows, nb] given (a per-row scale and correction are the caller's).
        kind "int8": int8 weights in 32-byte units, y = sum_b f_b dot_b.
        Arguments: weight row, activations (row m at x + 32 kx m), kx, s, z (bf16 bits, grouped
        only), f or dx [rows, nb], xs [rows, nb], nb, chunks (32 bytes) per block, xor, y; then
        n: weight rows to do (row i at w + i wstride bytes, its scales at s + i sstride, its
        results at y + i + m ystride).
        """
        sig = types.void(types.uint64, types.uint64, types.int64, types.uint64, types.uint64,
                         types.uint64, types.uint64, types.int64, types.int64, types.uint8,
                         types.uint64, types.int64, types.int64, types.int64, types.int64)
        int4 = kind != "int8"
        # AVX2 int4: vpmaddubsw pairs (|q| <= 15, |a| <= 127: each lane <= 3810) add up in
        # int16 over a block of up to 4 chunks (8 products, 30480 < 32767), then one vpmaddwd.
        wide16 = int4 and not _VNNI

        def codegen(context, builder, signature, args):
            (w_a, x_a, kx, s_a, z_a, f_a, xs_a, nb, cpb, xor, y_a, n, wstride, sstride,
             ystride) = args
            xp = _ptr(builder, x_a, _V32I8)
            fp, xsp = (_ptr(builder, a, _F32) for a in (f_a, xs_a))
            w0, y0 = _ptr(builder, w_a, _I8), _ptr(builder, y_a, _F32)
            s0, z0 = _ptr(builder, s_a, _I16), _ptr(builder, z_a, _I16)
            acc_t = _V16I16 if wide16 else _V8I32
            acc_zero = ir.Constant(acc_t, [0] * acc_t.count)
            # two integer chains per row with VNNI (vpdpbusd's latency), one otherwise
            chains = 2 if (_VNNI and int4) else 1
            accf = [cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
                    for _ in range(rows)]
            bias = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
                    for _ in range(rows)]
            acc = [[cgutils.alloca_once_value(builder, acc_zero) for _ in range(chains)]
                   for _ in range(rows)]
            sign = _fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
            pmadd = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
            pmaddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
            phadd = _fn(builder, "llvm.x86.avx2.phadd.d", _V8I32, [_V8I32, _V8I32])
            one = ir.Constant(_I64, 1)

            def xrow(m, unit):  # the 32 activation bytes of unit `unit` in row m
                i = builder.add(builder.mul(ir.Constant(_I64, m), kx), unit)
                return builder.load(builder.gep(xp, [i]), align=1)

            def chunk(c):  # one 32-byte chunk of weights, with every activation row
                w = builder.load(builder.gep(wp, [c]), align=1)
                if int4:
                    hi, lo = _nibbles(builder, w, xor) if kind == "int4" else \
                        _nibbles(builder, w, None)
                    c2 = builder.shl(c, one)
                    for m in range(rows):
                        xh, xl = xrow(m, c2), xrow(m, builder.add(c2, one))
                        if wide16:
                            p = builder.add(builder.call(pmadd, [hi, xh]),
                                            builder.call(pmadd, [lo, xl]))
                            builder.store(builder.add(builder.load(acc[m][0]), p), acc[m][0])
                        else:
                            ah, al = acc[m]
                            builder.store(_dot(builder, hi, xh, builder.load(ah)), ah)
                            builder.store(_dot(builder, lo, xl, builder.load(al)), al)
                    return
                if _VNNI:  # w + 128 as unsigned; the caller subtracts 128 * sum(x)
                    aw = builder.xor(w, ir.Constant(_V32I8, [-128] * 32))
                else:  # |w| x sign(w) x: pairs of products stay inside int16
                    aw = builder.call(sign, [w, w])
                for m in range(rows):
                    x = xrow(m, c)
                    sx = x if _VNNI else builder.call(sign, [x, w])
                    a = acc[m][0]
                    builder.store(_dot(builder, aw, sx, builder.load(a)), a)

            def block_totals(b, per_block):
                """The integer dot products (8 x i32 partial sums) of block b, per row."""
                for row in acc:
                    for a in row:
                        builder.store(acc_zero, a)
                if isinstance(per_block, int):
                    first = builder.mul(b, ir.Constant(_I64, per_block))
                    for j in range(per_block):
                        chunk(builder.add(first, ir.Constant(_I64, j)))
                else:
                    with cgutils.for_range(builder, per_block) as lc:
                        chunk(builder.add(builder.mul(b, per_block), lc.index))
                totals = []
                for m in range(rows):
                    if wide16:
                        totals.append(builder.call(pmaddwd, [builder.load(acc[m][0]), _ONES16]))
                    else:
                        tot = builder.load(acc[m][0])
                        for a in acc[m][1:]:
                            tot = builder.add(tot, builder.load(a))
                        totals.append(tot)
                return totals

            def lane_sums(ts):
                """8 vectors (8 x i32) -> one whose lane j is the sum of ts[j]'s lanes."""
                a = [builder.call(phadd, [ts[i], ts[i + 1]]) for i in range(0, 8, 2)]
                b = [builder.call(phadd, [a[0], a[1]]), builder.call(phadd, [a[2], a[3]])]
                lo = builder.shuffle_vector(b[0], b[1], ir.Constant(
                    ir.VectorType(_I32, 8), [0, 1, 2, 3, 8, 9, 10, 11]))
                hi = builder.shuffle_vector(b[0], b[1], ir.Constant(
                    ir.VectorType(_I32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
                return builder.add(lo, hi)

            def bf16x8(ptr, i):  # 8 bfloat16 values at ptr[i] as 8 x float32
                v = builder.load(builder.bitcast(builder.gep(ptr, [i]),
                                                 ir.VectorType(_I16, 8).as_pointer()), align=2)
                v = builder.shl(builder.zext(v, _V8I32), ir.Constant(_V8I32, [16] * 8))
                return builder.bitcast(v, _V8F32)

            def f32x8(ptr, i):
                return builder.load(builder.bitcast(builder.gep(ptr, [i]), _V8F32.as_pointer()),
                                    align=4)

            def blocks(per_block):
                """The loop over blocks, 8 at a time (their sums scaled by one vector multiply)
                then one by one; chunks unrolled when per_block is a constant."""
                eight = ir.Constant(_I64, 8)
                with cgutils.for_range(builder, builder.sdiv(nb, eight)) as lg:
                    b0 = builder.mul(lg.index, eight)
                    parts = [[] for _ in range(rows)]
                    for j in range(8):
                        b = builder.add(b0, ir.Constant(_I64, j))
                        for m, t in enumerate(block_totals(b, per_block)):
                            parts[m].append(t)
                    if kind == "grouped":
                        sv = bf16x8(sp, b0)
                        zc = builder.fsub(bf16x8(zp, b0), builder.fmul(
                            ir.Constant(_V8F32, [8.0] * 8), sv))
                    for m in range(rows):
                        i = builder.add(builder.mul(ir.Constant(_I64, m), nb), b0)
                        f = f32x8(fp, i)
                        if kind == "grouped":
                            f = builder.fmul(f, sv)
                            builder.store(_fma(builder, zc, f32x8(xsp, i),
                                               builder.load(accf[m])), accf[m])
                        tot = builder.sitofp(lane_sums(parts[m]), _V8F32)
                        builder.store(_fma(builder, tot, f, builder.load(accf[m])), accf[m])
                rest = builder.mul(builder.sdiv(nb, eight), eight)
                with cgutils.for_range_slice(builder, rest, nb, one) as (b, _):
                    totals = block_totals(b, per_block)
                    if kind == "grouped":
                        sg = _load_bf16(builder, sp, b)
                        zc = builder.fsub(_load_bf16(builder, zp, b),
                                          builder.fmul(ir.Constant(_F32, 8.0), sg))
                    for m in range(rows):
                        i = builder.add(builder.mul(ir.Constant(_I64, m), nb), b)
                        f = builder.load(builder.gep(fp, [i]))
                        if kind == "grouped":
                            f = builder.fmul(f, sg)
                            xs = builder.load(builder.gep(xsp, [i]))
                            builder.store(
                                builder.fadd(builder.load(bias[m]), builder.fmul(zc, xs)),
                                bias[m])
                        builder.store(_fma(builder, builder.sitofp(totals[m], _V8F32),
                                           _splat(builder, f, 8), builder.load(accf[m])),
                                      accf[m])

            def dispatch():
                """The usual chunks per block unrolled (128 columns: 2 int4 chunks, 4 int8
                units; 64 columns: half that), any other count in a loop."""
                sizes = (2, 1) if int4 else (4, 2)
                usual_ = builder.icmp_signed("==", cpb, ir.Constant(_I64, sizes[0]))
                with builder.if_else(usual_) as (usual, other):
                    with usual:
                        blocks(sizes[0])
                    with other:
                        half_ = builder.icmp_signed("==", cpb, ir.Constant(_I64, sizes[1]))
                        with builder.if_else(half_) as (half, rest):
                            with half:
                                blocks(sizes[1])
                            with rest:
                                blocks(cpb)

            with cgutils.for_range(builder, n) as lr:
                r = lr.index
                # the closures above read these: this weight row's bytes, scales and zeros
                wp = builder.bitcast(builder.gep(w0, [builder.mul(r, wstride)]),
                                     _V32I8.as_pointer())
                sp = builder.gep(s0, [builder.mul(r, sstride)])
                zp = builder.gep(z0, [builder.mul(r, sstride)])
                for m in range(rows):
                    builder.store(ir.Constant(_V8F32, [0.0] * 8), accf[m])
                    builder.store(ir.Constant(_F32, 0.0), bias[m])
                dispatch()
                for m in range(rows):
                    y = builder.fadd(_hsum(builder, builder.load(accf[m])),
                                     builder.load(bias[m]))
                    i = builder.add(builder.mul(ir.Constant(_I64, m), ystride), r)
                    builder.store(y, builder.gep(y0, [i]))
            return context.get_dummy_value()

        def typer(typingctx, w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, wstride, sstride,
                  ystride):
            return sig, codegen

        typer.__name__ = f"_dot_{kind}_{rows}"
        return intrinsic(typer)

    _GROUPED = [_rows_kernel("grouped", r) for r in range(1, MAX_ROWS + 1)]
    _INT4 = [_rows_kernel("int4", r) for r in range(1, MAX_ROWS + 1)]
    _INT8 = [_rows_kernel("int8", r) for r in range(1, MAX_ROWS + 1)]
    _G1, _G2, _G3, _G4 = _GROUPED
    _Q1, _Q2, _Q3, _Q4 = _INT4
    _B1, _B2, _B3, _B4 = _INT8

    @intrinsic
    def _bf16(typingctx, u):
        """bfloat16 bits (uint16) -> float32."""
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            return _bf16_value(builder, args[0])

        return sig, codegen

    @intrinsic
    def _fp16(typingctx, u):
        """float16 bits (uint16) -> float32."""
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):
            h = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(h, _F32)

        return sig, codegen

    @intrinsic
    def _bf16_bits(typingctx, x):
        """float32 -> bfloat16 bits (uint16), rounded to nearest even like torch's cast."""
        sig = types.uint16(types.float32)

        def codegen(context, builder, signature, args):
            u = builder.bitcast(args[0], _I32)
            odd = builder.and_(builder.lshr(u, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
            u = builder.add(u, builder.add(ir.Constant(_I32, 0x7FFF), odd))
            return builder.trunc(builder.lshr(u, ir.Constant(_I32, 16)), _I16)

        return sig, codegen

    _ROWS = 32  # output rows per parallel task

    @njit(cache=True, fastmath=True)
    def _absmax(v):
        amax = np.float32(0.0)
        for i in range(v.shape[0]):
            amax = max(amax, abs(v[i]))
        return amax

    _ROUND = np.float32(12582912.0)  # 1.5 * 2**23: y + R - R rounds |y| < 2**22 half to even

    @njit(cache=True)
    def _quantize_row(v, blk, pair, t, q, dx, xs):
        """int8 activations of one row per block of blk columns: q (permuted to even/odd
        halves per 64 columns when pair; t is scratch), scales dx, xs = dx * sum(q)."""
        if not pair:
            t = q  # no permutation: quantize in place
        for b in range(v.shape[0] // blk):
            lo = b * blk
            d = _absmax(v[lo:lo + blk]) / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            total = np.int32(0)
            vb, tb = v[lo:lo + blk], t[lo:lo + blk]
            for i in range(blk):  # the same as np.rint, and vectorised
                r = np.int32((vb[i] * inv + _ROUND) - _ROUND)
                tb[i] = np.int8(r)
                total += r
            dx[b] = d
            xs[b] = np.float32(total) * d
        if not pair:
            return
        pairs = t.view(np.uint16)  # (column 2j, column 2j + 1) of each 64 -> j, 32 + j
        qb = q.view(np.uint8)
        for base in range(0, v.shape[0] // 2, 32):
            for j in range(32):
                p = pairs[base + j]
                qb[2 * base + j] = np.uint8(p & 0xFF)
                qb[2 * base + 32 + j] = np.uint8(p >> 8)

    @njit(cache=True)
    def _quantize_x(x, blk, pair, xq, dx, xs):
        """float32 activations x [M, K] -> xq [M, K], dx and xs [M, K/blk]."""
        t = np.empty(x.shape[1], np.int8)
        for m in range(x.shape[0]):
            _quantize_row(x[m], blk, pair, t, xq[m], dx[m], xs[m])

    @njit(cache=True)
    def _quantize_half(xb, bf16, blk, pair, xq, dx, xs):
        """Like _quantize_x for bf16 or fp16 activations given as their bits (uint16)."""
        k = xb.shape[1]
        v = np.empty(k, np.float32)
        t = np.empty(k, np.int8)
        for m in range(xb.shape[0]):
            for i in range(k):
                v[i] = _bf16(xb[m, i]) if bf16 else _fp16(xb[m, i])
            _quantize_row(v, blk, pair, t, xq[m], dx[m], xs[m])

    @njit(cache=True, fastmath=True)
    def _group_factors(srow, zrow, dxm, xsm, per_group, f):
        """f[b] = dx[b] * s[g(b)] for this row and activation row; returns the zero-point
        correction sum_g (z_g - 8 s_g) * sum_{b in g} xs[b]. fastmath lets LLVM vectorise it."""
        bias = np.float32(0.0)
        if per_group == 1:
            for g in range(srow.shape[0]):
                sg = _bf16(srow[g])
                f[g] = dxm[g] * sg
                bias += (_bf16(zrow[g]) - np.float32(8.0) * sg) * xsm[g]
            return bias
        for g in range(srow.shape[0]):
            sg = _bf16(srow[g])
            gs = np.float32(0.0)
            for b in range(g * per_group, (g + 1) * per_group):
                f[b] = dxm[b] * sg
                gs += xsm[b]
            bias += (_bf16(zrow[g]) - np.float32(8.0) * sg) * gs
        return bias

    # One function per kind that picks the kernel for mm (1..MAX_ROWS) activation rows.
    @njit(cache=True)
    def _dot_grouped(mm, w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys):
        if mm == 4:
            _G4(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        elif mm == 3:
            _G3(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        elif mm == 2:
            _G2(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        else:
            _G1(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)

    @njit(cache=True)
    def _dot_int4(mm, w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys):
        if mm == 4:
            _Q4(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        elif mm == 3:
            _Q3(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        elif mm == 2:
            _Q2(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        else:
            _Q1(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)

    @njit(cache=True)
    def _dot_int8(mm, w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys):
        if mm == 4:
            _B4(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        elif mm == 3:
            _B3(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        elif mm == 2:
            _B2(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)
        else:
            _B1(w, x, kx, s, z, f, xs, nb, cpb, xor, y, n, ws, ss, ys)

    @njit(parallel=True, cache=True)
    def _int4_grouped(w, s, z, xq, dx, xs, group, out):
        """localglm int4: w uint8 [N, K/2], s and z bf16 bits [N, G]; weight (q-8)*s + z."""
        n, half = w.shape
        m_rows, k = xq.shape
        nb = dx.shape[1]
        blk = k // nb  # activation block: 32 (group 32) or 64/128
        per_group = group // blk
        wa, xa, oa = w.ctypes.data, xq.ctypes.data, out.ctypes.data
        if per_group == 1 and blk >= 64:  # one activation block per group: a single pass
            sa, za, dxa, xsa = s.ctypes.data, z.ctypes.data, dx.ctypes.data, xs.ctypes.data
            for t in prange((n + _ROWS - 1) // _ROWS):
                r0 = t * _ROWS
                for m0 in range(0, m_rows, MAX_ROWS):
                    _dot_grouped(min(MAX_ROWS, m_rows - m0), wa + r0 * half, xa + m0 * k,
                                 k // 32, sa + r0 * nb * 2, za + r0 * nb * 2, dxa + m0 * nb * 4,
                                 xsa + m0 * nb * 4, nb, blk // 64, np.uint8(0),
                                 oa + (m0 * n + r0) * 4, min(n, r0 + _ROWS) - r0, half, nb, n)
            return
        for t in prange((n + _ROWS - 1) // _ROWS):
            f = np.empty((m_rows, nb), np.float32)
            bias = np.empty(m_rows, np.float32)
            for r in range(t * _ROWS, min(n, t * _ROWS + _ROWS)):
                for m in range(m_rows):
                    bias[m] = _group_factors(s[r], z[r], dx[m], xs[m], per_group, f[m])
                if blk == 32:
                    for m in range(m_rows):
                        out[m, r] = bias[m] + _int4_row_halves(
                            wa + r * half, xa + m * k, f[m].ctypes.data, half // 32,
                            np.uint8(0))
                    continue
                for m0 in range(0, m_rows, MAX_ROWS):
                    _dot_int4(min(MAX_ROWS, m_rows - m0), wa + r * half, xa + m0 * k, k // 32,
                              0, 0, f.ctypes.data + m0 * nb * 4, 0, nb, blk // 64, np.uint8(0),
                              oa + (m0 * n + r) * 4, 1, half, 0, n)
                for m in range(m_rows):
                    out[m, r] += bias[m]

    @njit(parallel=True, cache=True)
    def _rowscaled(w, s, xq, dx, xs, bits, out):
        """Per-row formats: official int4 (w int8 [N, K/2] signed nibbles) or int8 (w int8
        [N, K]); s fp16 bits [N]. y = s * (sum_b dx_b dot_b - 8 sum_b xs_b) (int4)."""
        n, row_bytes = w.shape
        m_rows, k = xq.shape
        nb = dx.shape[1]
        blk = k // nb
        wa, xa, dxa, oa = w.ctypes.data, xq.ctypes.data, dx.ctypes.data, out.ctypes.data
        # the activations' sum per row, times the weights' offset (8 for int4 nibbles)
        corr = np.zeros(m_rows, np.float32)
        offset = np.float32(8.0) if bits == 4 else np.float32(INT8_OFFSET)
        for m in range(m_rows):
            for b in range(nb):
                corr[m] += xs[m, b]
            corr[m] *= offset
        for t in prange((n + _ROWS - 1) // _ROWS):
            r0 = t * _ROWS
            r1 = min(n, r0 + _ROWS)
            for m0 in range(0, m_rows, MAX_ROWS):
                mm = min(MAX_ROWS, m_rows - m0)
                if bits == 4:
                    _dot_int4(mm, wa + r0 * row_bytes, xa + m0 * k, k // 32, 0, 0,
                              dxa + m0 * nb * 4, 0, nb, blk // 64, np.uint8(0x88),
                              oa + (m0 * n + r0) * 4, r1 - r0, row_bytes, 0, n)
                else:
                    _dot_int8(mm, wa + r0 * row_bytes, xa + m0 * k, k // 32, 0, 0,
                              dxa + m0 * nb * 4, 0, nb, blk // 32, np.uint8(0),
                              oa + (m0 * n + r0) * 4, r1 - r0, row_bytes, 0, n)
            for r in range(r0, r1):
                sr = _fp16(s[r])
                for m in range(m_rows):
                    out[m, r] = sr * (out[m, r] - corr[m])

_threads = [0]


def sync_threads() -> None:
    """Run the kernels on as many threads as PyTorch's pool (torch.set_num_threads), never
    more: the two pools take turns on the same cores."""
    n = min(torch.get_num_threads(), _nb_config.NUMBA_NUM_THREADS)
    if n != _threads[0]:
        import numba

        numba.set_num_threads(n)
        _threads[0] = n


def _u16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def operands(weight: torch.Tensor, scale: torch.Tensor,
             zero: torch.Tensor | None = None) -> tuple:
    """The arrays the kernels read, without copies: weight as stored, scales and zeros as
    their 16-bit patterns. A layer can keep these between calls (they share its memory)."""
    return (weight.numpy(), _u16(scale), None if zero is None else _u16(zero))


def _prep_x(x2: torch.Tensor, blk: int, pair: bool):
    sync_threads()
    m, k = x2.shape
    xq = np.empty((m, k), np.int8)
    dx = np.empty((m, k // blk), np.float32)
    xs = np.empty((m, k // blk), np.float32)
    x2 = x2.detach()
    if x2.dtype in (torch.bfloat16, torch.float16):
        _quantize_half(_u16(x2), x2.dtype == torch.bfloat16, blk, pair, xq, dx, xs)
    else:
        _quantize_x(x2.to(torch.float32).contiguous().numpy(), blk, pair, xq, dx, xs)
    return xq, dx, xs


def matmul_int4(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor | None, group: int, ops: tuple | None = None) -> torch.Tensor:
    """x2 [M, K] @ dequantized int4 weight.T -> float32 [M, N].

    group 0: THUDM's per-row layout (weight int8 [N, K/2], scale fp16 [N]); else localglm
    group-wise (weight uint8 [N, K/2], scale and zero bf16 [N, K/group]). K % 64 == 0.
    ops: `operands(weight, scale, zero)`, if the caller keeps them.
    """
    w, s, z = ops or operands(weight, scale, zero)
    out = np.empty((x2.shape[0], w.shape[0]), np.float32)
    xq, dx, xs = _prep_x(x2, block(4, group, x2.shape[1]), True)
    if group == 0:
        _rowscaled(w, s, xq, dx, xs, 4, out)
    else:
        _int4_grouped(w, s, z, xq, dx, xs, group, out)
    return torch.from_numpy(out)


def matmul_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                ops: tuple | None = None) -> torch.Tensor:
    """x2 [M, K] @ (int8 weight [N, K] * fp16 scale [N]).T -> float32 [M, N]. K % 64 == 0."""
    w, s, _ = ops or operands(weight, scale)
    out = np.empty((x2.shape[0], w.shape[0]), np.float32)
    xq, dx, xs = _prep_x(x2, block(8, 0, x2.shape[1]), False)
    _rowscaled(w, s, xq, dx, xs, 8, out)
    return torch.from_numpy(out)


def block(bits: int, group: int, in_features: int) -> int:
    """Activation columns per int8 scale: the group (at most BLOCK) for group-wise int4, else
    BLOCK, or 64 where in_features is not a multiple of BLOCK."""
    if bits == 8 or group == 0:
        return BLOCK if in_features % BLOCK == 0 else 64
    return 32 if group == 32 else min(group, BLOCK)


def shape_ok(bits: int, group: int, in_features: int) -> bool:
    """Whether the kernels take this layer: K a multiple of the activation block and of the
    64 columns one 32-byte load of int4 holds."""
    return in_features % max(64, block(bits, group, in_features)) == 0


if HAVE_NUMBA:

    @njit(parallel=True, cache=True)
    def _dequant_int4(w, s, z, group, signed, r0, bf16, out):
        """Rows r0 .. r0 + len(out) of an int4 weight, dequantized: (q - 8) * s + z per group
        (localglm), or the signed nibble times the row scale (official; u - 8 with u = nibble
        ^ 8 is the same value). out is bf16 pairs as uint32 [R, K/2] (low half = even column)
        when bf16, else float32 [R, K]. A group's 16 possible values are computed once, then
        each byte is two table reads."""
        rows = out.shape[0]
        k2 = w.shape[1]
        half = group // 2
        lut = np.empty((rows, 16), np.uint32)
        lutf = np.empty((rows, 16), np.float32)
        for i in prange(rows):
            r = r0 + i
            flip = np.int32(0x88) if signed else np.int32(0)
            for g in range(k2 // half):
                sg = _fp16(s[r, 0]) if signed else _bf16(s[r, g])
                zg = np.float32(0.0) if signed else _bf16(z[r, g])
                for q in range(16):
                    v = np.float32(q - 8) * sg + zg
                    lutf[i, q] = v
                    lut[i, q] = np.uint32(_bf16_bits(v))
                for jj in range(half):
                    j = g * half + jj
                    byte = np.int32(w[r, j]) ^ flip
                    if bf16:
                        out[i, j] = lut[i, (byte >> 4) & 15] | (lut[i, byte & 15] << 16)
                    else:
                        out[i, 2 * j] = lutf[i, (byte >> 4) & 15]
                        out[i, 2 * j + 1] = lutf[i, byte & 15]

    @njit(parallel=True, cache=True, fastmath=True)
    def _dequant_int8_bf16(w, s, r0, out):
        rows, k = out.shape
        for i in prange(rows):
            sr = _fp16(s[r0 + i])
            for j in range(k):
                out[i, j] = _bf16_bits(np.float32(w[r0 + i, j]) * sr)


def dequantize_tile(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    bits: int, group: int, rows: slice, out: torch.Tensor) -> torch.Tensor:
    """Output rows ``rows`` of a stored int4/int8 weight into ``out`` [R, K] (bf16 or
    float32): the reference's float32 value, rounded once to bf16 for a bf16 tile."""
    sync_threads()
    r0 = rows.start or 0
    w = weight.numpy()
    if bits == 8:
        if out.dtype == torch.bfloat16:
            _dequant_int8_bf16(w, _u16(scale), r0, out.view(torch.int16).numpy().view(np.uint16))
        else:
            torch.mul(weight[rows], scale[rows, None].float(), out=out)
        return out
    bf16 = out.dtype == torch.bfloat16
    o = out.view(torch.int16).numpy().view(np.uint32) if bf16 else out.numpy()
    if group == 0:
        s = _u16(scale)[:, None]
        _dequant_int4(w, s, s, 64, True, r0, bf16, o)
    else:
        _dequant_int4(w, _u16(scale), _u16(zero), group, False, r0, bf16, o)
    return out


_warm = False


def warm_up() -> None:
    """Compile every kernel for this CPU, or load it from the cache (once per process). The
    first compile on a machine takes seconds per kernel and says so on stderr."""
    global _warm
    if _warm or not supported():
        return
    _warm = True
    cache = os.environ.get("NUMBA_CACHE_DIR", "")
    fresh = not any(f.endswith(".nbi") for _, _, files in os.walk(cache) for f in files)
    if fresh:
        import sys

        print(f"localglm: compiling the CPU kernels for {isa()} once (cached in {cache})...",
              file=sys.stderr, flush=True)
    x = torch.zeros(1, BLOCK)
    for group in (0, 32, 64):
        n = BLOCK // 2
        w = torch.zeros(2, n, dtype=torch.int8 if group == 0 else torch.uint8)
        g = max(group, 1)
        s = torch.zeros(2, BLOCK // g, dtype=torch.bfloat16) if group else \
            torch.zeros(2, dtype=torch.float16)
        matmul_int4(x, w, s, s if group else None, group)
    matmul_int8(x, torch.zeros(2, BLOCK, dtype=torch.int8), torch.zeros(2, dtype=torch.float16))
