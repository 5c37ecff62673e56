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
        signed nibbles s into s + 8)."""
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

    def _block_dot(builder, wp, xp, b, cpb, xor, acc_h, acc_l):
        """Integer dot product (8 x i32 partial sums) of block b: chunks b*cpb .. b*cpb+cpb-1,
        accumulated in the allocas acc_h and acc_l (one chain per nibble half)."""
        zero = ir.Constant(_V8I32, [0] * 8)
        builder.store(zero, acc_h)
        builder.store(zero, acc_l)
        with cgutils.for_range(builder, cpb) as lc:
            c = builder.add(builder.mul(b, cpb), lc.index)
            h, lo = _chunk_dots(builder, wp, xp, c, xor, builder.load(acc_h),
                                builder.load(acc_l))
            builder.store(h, acc_h)
            builder.store(lo, acc_l)
        return builder.add(builder.load(acc_h), builder.load(acc_l))

    @intrinsic
    def _int4_row_blocks(typingctx, w_addr, x_addr, f_addr, nblocks, cpb, xor):
        """sum over blocks b of f[b] * (integer dot of cpb 32-byte chunks with activations).

        Chunk c (64 columns) is 32 bytes at w + 32c; its high nibbles pair with the 32 int8
        activations at x + 64c, its low nibbles with those at x + 64c + 32.
        """
        sig = types.float32(types.uint64, types.uint64, types.uint64, types.int64,
                            types.int64, types.uint8)

        def codegen(context, builder, signature, args):
            w_a, x_a, f_a, nb, cpb_, xor_ = args
            wp, xp, fp = _ptr(builder, w_a, _V32I8), _ptr(builder, x_a, _V32I8), \
                _ptr(builder, f_a, _F32)
            accf = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
            zero = ir.Constant(_V8I32, [0] * 8)
            acc_h = cgutils.alloca_once_value(builder, zero)
            acc_l = cgutils.alloca_once_value(builder, zero)
            with cgutils.for_range(builder, nb) as lb:
                tot = _block_dot(builder, wp, xp, lb.index, cpb_, xor_, acc_h, acc_l)
                f = _splat(builder, builder.load(builder.gep(fp, [lb.index])), 8)
                builder.store(_fma(builder, builder.sitofp(tot, _V8F32), f,
                                   builder.load(accf)), accf)
            return _hsum(builder, builder.load(accf))

        return sig, codegen

    def _bf16_value(builder, bits):
        """float32 value of bfloat16 bits (i16): they are its upper half."""
        u = builder.zext(bits, _I32)
        return builder.bitcast(builder.shl(u, ir.Constant(_I32, 16)), _F32)

    def _load_bf16(builder, ptr, idx):
        """float32 value of the bfloat16 bits at ptr[idx] (ptr: i16*)."""
        return _bf16_value(builder, builder.load(builder.gep(ptr, [idx])))

    @intrinsic
    def _int4_row_grouped(typingctx, w_addr, x_addr, s_addr, z_addr, dx_addr, xs_addr,
                          nblocks, cpb):
        """One row of localglm int4 whose groups are the activation blocks (group 64/128):
        sum_g dx_g * s_g * dot_g + (z_g - 8 s_g) * xs_g, with the scale and zero of each
        group read in the same pass as its nibbles (no per-row prologue)."""
        sig = types.float32(types.uint64, types.uint64, types.uint64, types.uint64,
                            types.uint64, types.uint64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            w_a, x_a, s_a, z_a, dx_a, xs_a, nb, cpb_ = args
            wp, xp = _ptr(builder, w_a, _V32I8), _ptr(builder, x_a, _V32I8)
            sp, zp = _ptr(builder, s_a, _I16), _ptr(builder, z_a, _I16)
            dxp, xsp = _ptr(builder, dx_a, _F32), _ptr(builder, xs_a, _F32)
            zero = ir.Constant(_V8I32, [0] * 8)
            accf = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
            bias = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
            acc_h = cgutils.alloca_once_value(builder, zero)
            acc_l = cgutils.alloca_once_value(builder, zero)
            with cgutils.for_range(builder, nb) as lb:
                b = lb.index
                tot = _block_dot(builder, wp, xp, b, cpb_, ir.Constant(_I8, 0), acc_h, acc_l)
                sg = _load_bf16(builder, sp, b)
                zg = _load_bf16(builder, zp, b)
                dx = builder.load(builder.gep(dxp, [b]))
                xs = builder.load(builder.gep(xsp, [b]))
                f = _splat(builder, builder.fmul(dx, sg), 8)
                builder.store(_fma(builder, builder.sitofp(tot, _V8F32), f,
                                   builder.load(accf)), accf)
                zc = builder.fsub(zg, builder.fmul(ir.Constant(_F32, 8.0), sg))
                builder.store(builder.fadd(builder.load(bias), builder.fmul(zc, xs)), bias)
            return builder.fadd(_hsum(builder, builder.load(accf)), builder.load(bias))

        return sig, codegen

    @intrinsic
    def _int4_row_halves(typingctx, w_addr, x_addr, f_addr, nchunks, xor):
        """Like _int4_row_blocks with one factor per 32 columns (groups of 32): in a chunk,
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

    @intrinsic
    def _int8_row_blocks(typingctx, w_addr, x_addr, f_addr, nblocks, upb):
        """sum over blocks b of f[b] * (integer dot of upb 32-byte units of int8 weights)."""
        sig = types.float32(types.uint64, types.uint64, types.uint64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            w_a, x_a, f_a, nb, upb_ = args
            wp, xp = _ptr(builder, w_a, _V32I8), _ptr(builder, x_a, _V32I8)
            fp = _ptr(builder, f_a, _F32)
            sign = _fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
            accf = cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8))
            with cgutils.for_range(builder, nb) as lb:
                zero = ir.Constant(_V8I32, [0] * 8)
                acc = cgutils.alloca_once_value(builder, zero)
                builder.store(zero, acc)
                with cgutils.for_range(builder, upb_) as lu:
                    u = builder.add(builder.mul(lb.index, upb_), lu.index)
                    w = builder.load(builder.gep(wp, [u]), align=1)
                    x = builder.load(builder.gep(xp, [u]), align=1)
                    if _VNNI:  # w + 128 as unsigned; the caller subtracts 128 * sum(x)
                        aw = builder.xor(w, ir.Constant(_V32I8, [-128] * 32))
                        sx = x
                    else:  # |w| x sign(w)*x: products of pairs stay inside vpmaddubsw's int16
                        aw = builder.call(sign, [w, w])
                        sx = builder.call(sign, [x, w])
                    builder.store(_dot(builder, aw, sx, builder.load(acc)), acc)
                tot = builder.load(acc)
                f = _splat(builder, builder.load(builder.gep(fp, [lb.index])), 8)
                builder.store(_fma(builder, builder.sitofp(tot, _V8F32), f,
                                   builder.load(accf)), accf)
            return _hsum(builder, builder.load(accf))

        return sig, codegen

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

    @njit(cache=True)
    def _quantize_x(x, blk, pair, xq, dx, xs):
        """int8 activations per block of blk columns: xq [M, K] (permuted to even/odd
        halves per 64 columns when pair), dx scales [M, K/blk], xs = dx * sum(xq) [M, K/blk]."""
        m_rows, k = x.shape
        for m in range(m_rows):
            for b in range(k // blk):
                amax = np.float32(0.0)
                for i in range(b * blk, (b + 1) * blk):
                    a = abs(x[m, i])
                    if a > amax:
                        amax = a
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
                total = 0
                for i in range(b * blk, (b + 1) * blk):
                    q = np.int8(np.rint(x[m, i] * inv))
                    total += q
                    if pair:  # column i of a 64-block -> even half or odd half
                        base = i - (i & 63)
                        j = base + ((i & 63) >> 1) + 32 * (i & 1)
                    else:
                        j = i
                    xq[m, j] = q
                dx[m, b] = d
                xs[m, b] = np.float32(total) * d

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

    @njit(parallel=True, cache=True)
    def _int4_grouped(w, s, z, xq, dx, xs, group, out):
        """localglm int4: w uint8 [N, K/2], s and z bf16 bits [N, G]; weight (q-8)*s + z."""
        n, half = w.shape
        m_rows, k = xq.shape
        nb = dx.shape[1]
        blk = k // nb  # activation block: 32 (group 32) or 64/128
        per_group = group // blk
        wa, xa = w.ctypes.data, xq.ctypes.data
        if per_group == 1 and blk >= 64:  # one activation block per group: a single pass
            sa, za, dxa, xsa = s.ctypes.data, z.ctypes.data, dx.ctypes.data, xs.ctypes.data
            for t in prange((n + _ROWS - 1) // _ROWS):
                for r in range(t * _ROWS, min(n, t * _ROWS + _ROWS)):
                    for m in range(m_rows):
                        out[m, r] = _int4_row_grouped(
                            wa + r * half, xa + m * k, sa + r * nb * 2, za + r * nb * 2,
                            dxa + m * nb * 4, xsa + m * nb * 4, nb, blk // 64)
            return
        for t in prange((n + _ROWS - 1) // _ROWS):
            f = np.empty(nb, np.float32)
            fa = f.ctypes.data
            for r in range(t * _ROWS, min(n, t * _ROWS + _ROWS)):
                for m in range(m_rows):
                    bias = _group_factors(s[r], z[r], dx[m], xs[m], per_group, f)
                    xrow = xa + m * k
                    if blk == 32:
                        y = _int4_row_halves(wa + r * half, xrow, fa, half // 32, np.uint8(0))
                    else:
                        y = _int4_row_blocks(wa + r * half, xrow, fa, nb, blk // 64,
                                             np.uint8(0))
                    out[m, r] = y + bias

    @njit(parallel=True, cache=True)
    def _rowscaled(w, s, xq, dx, xs, bits, out):
        """Per-row formats: official int4 (w int8 [N, K/2] signed nibbles) or int8 (w int8
        [N, K]); s fp16 bits [N]. y = s * (sum_b dx_b dot_b - 8 sum_b xs_b) (int4)."""
        n, row_bytes = w.shape
        m_rows, k = xq.shape
        nb = dx.shape[1]
        blk = k // nb
        wa, xa = w.ctypes.data, xq.ctypes.data
        corr = np.zeros(m_rows, np.float32)  # sum of the activations, per activation row
        for m in range(m_rows):
            for b in range(nb):
                corr[m] += xs[m, b]
        for t in prange((n + _ROWS - 1) // _ROWS):
            for r in range(t * _ROWS, min(n, t * _ROWS + _ROWS)):
                sr = _fp16(s[r])
                for m in range(m_rows):
                    fa = dx.ctypes.data + m * nb * 4
                    xrow = xa + m * k
                    if bits == 4:
                        y = _int4_row_blocks(wa + r * row_bytes, xrow, fa, nb, blk // 64,
                                             np.uint8(0x88))
                        out[m, r] = sr * (y - np.float32(8.0) * corr[m])
                    else:
                        y = _int8_row_blocks(wa + r * row_bytes, xrow, fa, nb, blk // 32)
                        out[m, r] = sr * (y - np.float32(INT8_OFFSET) * corr[m])

_threads = [0]


def _sync_threads() -> None:
    """Run the kernels on as many threads as PyTorch's pool (torch.set_num_threads), never
    more: the two pools take turns on the same cores."""
    n = min(torch.get_num_threads(), _nb_config.NUMBA_NUM_THREADS)
    if n != _threads[0]:
        import numba

        numba.set_num_threads(n)
        _threads[0] = n


def _u16(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _prep_x(x2: torch.Tensor, blk: int, pair: bool):
    _sync_threads()
    m, k = x2.shape
    xf = x2.detach().to(torch.float32).contiguous().numpy()
    xq = np.empty((m, k), np.int8)
    dx = np.empty((m, k // blk), np.float32)
    xs = np.empty((m, k // blk), np.float32)
    _quantize_x(xf, blk, pair, xq, dx, xs)
    return xq, dx, xs


def matmul_int4(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor | None, group: int) -> torch.Tensor:
    """x2 [M, K] @ dequantized int4 weight.T -> float32 [M, N].

    group 0: THUDM's per-row layout (weight int8 [N, K/2], scale fp16 [N]); else localglm
    group-wise (weight uint8 [N, K/2], scale and zero bf16 [N, K/group]). K % 64 == 0.
    """
    n = weight.shape[0]
    out = np.empty((x2.shape[0], n), np.float32)
    xq, dx, xs = _prep_x(x2, block(4, group, x2.shape[1]), True)
    if group == 0:
        _rowscaled(weight.numpy(), _u16(scale), xq, dx, xs, 4, out)
    else:
        _int4_grouped(weight.numpy(), _u16(scale), _u16(zero), xq, dx, xs, group, out)
    return torch.from_numpy(out)


def matmul_int8(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ (int8 weight [N, K] * fp16 scale [N]).T -> float32 [M, N]. K % 64 == 0."""
    out = np.empty((x2.shape[0], weight.shape[0]), np.float32)
    xq, dx, xs = _prep_x(x2, block(8, 0, x2.shape[1]), False)
    _rowscaled(weight.numpy(), _u16(scale), xq, dx, xs, 8, out)
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
    _sync_threads()
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
