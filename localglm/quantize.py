"""Weight-only int8/int4 quantization of the block linears of ChatGLM-6B.

Two stored ("portable") formats, both plain tensors that safetensors can hold:

* ``"official"`` -- THUDM's chatglm-6b-int8 / -int4 layout, one scale per output row:
  ``weight`` int8 [out, in] (int8) or [out, in/2] (int4: two signed nibbles per byte, HIGH
  nibble = even column), ``weight_scale`` float16 [out]. Weight = float32(q) * float32(scale).
  Used for ``group_size == 0`` (and for every int8 layer); ``quantize_*_official`` reproduce
  THUDM's checkpoints bit for bit.
* ``"localglm"`` -- group-wise asymmetric int4 (``group_size`` in 32/64/128/256):
  ``weight`` uint8 [out, ceil(in/2)] (unsigned nibbles 0..15, HIGH nibble = even column),
  ``weight_scale`` and ``weight_zero`` bfloat16 [out, ceil(in/group)];
  weight = (q - 8) * scale + zero. That is exactly the dequantization rule of PyTorch's int4
  kernels, and bf16 is exactly the scale dtype those kernels take with bf16 activations, so the
  fast path computes with the stored numbers, not a rounded copy. Asymmetric min/max groups were
  chosen over symmetric absmax/7 groups because they measured 30-45 % lower weight MSE (Gaussian
  and Student-t(4) weights, groups of 32..128).

`QuantizedLinear` holds the stored form in its buffers (what ``state_dict`` saves) and derives
the kernel layout lazily on the first fast call (or at `QuantizedLinear.prepare`); that copy is
never saved and is dropped whenever the module is moved, cast or reloaded.

Kernel facts measured on torch 2.13.0+cpu (AVX2, AMD EPYC), see benchmarks/bench_linear.py:

* ``_weight_int4pack_mm_for_cpu(x[M,K], packed, group, scales_and_zeros[K/group, N, 2])``
  computes ``x @ ((q - 8) * scale + zero).T``; ``zero`` is a float offset, not an integer
  zero-point. Group must be 32/64/128/256 and divide K; N % 16 == 0 (checked in
  ``_convert_weight_to_int4pack_for_cpu``, which takes int32 [N, K] values 0..15 and ignores
  ``innerKTiles``); x must be 2-D and contiguous; scales_and_zeros must have x's dtype.
* ``_weight_int8pack_mm(x[M,K], int8 [N,K], scales[N])``: scales must have x's dtype. With
  bf16 x it reads out of bounds (segfault or garbage) unless K % 8 == 0 on AVX2, so we require
  K % 32 == 0 for the reduced-precision dtypes.
* Both kernels accept float32/float16/bfloat16 activations and are exact, but only bf16 is
  vectorized here: the fp32/fp16 kernels are scalar and beat dequantize + fp32 GEMM only for
  1-2 rows. `forward` therefore uses the kernel for bf16 up to 256 rows and for fp32/fp16 at
  decode sizes (`QuantizedLinear.cpu_dequant_min_rows`, `QuantizedLinear.cpu_kernel_max_rows`);
  everything else takes `forward_reference`, which on CPU dequantizes to float32 and runs an
  fp32 GEMM (4-6x faster than bf16 GEMM on CPUs without bf16 units, and exact).
* On CUDA only the int4 kernel (``_weight_int4pack_mm``, bf16) is used; PyTorch's CUDA int8
  kernel is a naive fp32 loop, slower than dequantize + cuBLAS. (No GPU was available when this
  was written: that path is untested.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFormatError

__all__ = [
    "INT4_GROUP_SIZES",
    "QUANTIZED_LINEAR_NAMES",
    "QuantizedLinear",
    "dequantize_int4_grouped",
    "dequantize_int4_official",
    "dequantize_int8",
    "make_quantized_skeleton",
    "pack_int4_official",
    "quantize_int4_grouped",
    "quantize_int4_official",
    "quantize_int8_official",
    "quantize_int8_rowwise",
    "quantize_model",
    "unpack_int4_grouped",
    "unpack_int4_official",
]

QUANTIZED_LINEAR_NAMES = (
    "attention.query_key_value",
    "attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
# Group sizes PyTorch's int4 kernels accept (CPU and CUDA).
INT4_GROUP_SIZES = (32, 64, 128, 256)
FORMATS = ("official", "localglm")
# Buffers that keep their stored dtype whatever the compute dtype (casting would round them).
SCALE_SUFFIXES = ("weight_scale", "weight_zero")
# Group size used to run per-row (official) int4 weights through the group-wise kernel: every
# group gets the row's scale, so any size is lossless. Kernel speed did not depend on the group
# size beyond noise (32/64/128); 128 keeps the derived scale table 4x smaller than 32.
OFFICIAL_INT4_KERNEL_GROUP = 128
_LOCAL_SCALE_DTYPE = torch.bfloat16  # localglm int4 scales/zeros: what the bf16 kernel consumes
# CUDA code path (untested here: no GPU when this was written); only taken if the build has it.
_HAS_CUDA_INT4 = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "aten::_weight_int4pack_mm", "CUDA"
)


# ---------------------------------------------------------------------------------------------
# Pure primitives
# ---------------------------------------------------------------------------------------------


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")


def quantize_int8_official(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's int8 recipe, bit-exact: per-row absmax/127 scale, everything in float16.

    Returns ``(q, scale)``: q int8 [out, in] in [-127, 127], scale float16 [out].
    Rows that are all zero get scale 0 and q 0 (the official code would divide 0 by 0).
    """
    return _quantize_official(w, bits=8)


def quantize_int4_official(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's int4 recipe, bit-exact: per-row absmax/7 scale in float16, packed nibbles.

    Returns ``(packed, scale)``: packed int8 [out, in/2] (high nibble = column 2j, low nibble =
    column 2j+1, signed values in [-7, 7]), scale float16 [out]. ``in`` must be even.
    """
    _check_2d(w, "quantize_int4_official")
    if w.shape[1] % 2:
        raise ValueError(
            f"official int4 packs two columns per byte; in_features must be even, "
            f"got weight shape {tuple(w.shape)}"
        )
    q, scale = _quantize_official(w, bits=4)
    return pack_int4_official(q), scale


def _quantize_official(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_2d(w, f"quantize_int{bits}_official")
    # The official QuantizedLinear runs on the fp16 checkpoint tensor, so every step (max, the
    # division by 7/127, w / scale, round half-to-even) is an fp16 operation.
    w = w.detach().to(torch.float16)  # [out, in]
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=-1) / qmax).half()  # [out]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # zero rows: q = 0/1 = 0
    q = torch.round(w / safe[:, None]).to(torch.int8)  # [out, in]
    return q, scale


def quantize_int8_rowwise(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 computed in float32 (any input dtype).

    Returns ``(q, scale)``: q int8 [out, in] in [-127, 127], scale [out] in ``scale_dtype``
    (float16 by default, the official checkpoint dtype). q is rounded against the *stored*
    (rounded) scale, so ``dequantize_int8(q, scale)`` is the best reconstruction the stored pair
    allows. For THUDM's exact fp16 arithmetic use `quantize_int8_official`.
    """
    _check_2d(w, "quantize_int8_rowwise")
    w = w.detach().float()  # [out, in]
    scale = (w.abs().amax(dim=-1) / 127).to(scale_dtype)  # [out]
    s32 = scale.float()
    safe = torch.where(s32 == 0, torch.ones_like(s32), s32)
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # [out, in]
    return q, scale


def dequantize_int8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference int8 dequantization: ``float32(q) * float32(scale)[:, None]``, cast to dtype."""
    # copy_ + in-place mul: 4-7x faster on CPU than `q.float() * s`, whose mixed-dtype multiply
    # and extra temporary dominate the fallback path (same single fp32 rounding per element).
    w = torch.empty(q.shape, dtype=torch.float32, device=q.device).copy_(q)  # [out, in]
    w.mul_(scale.float()[:, None])
    return w.to(dtype)


def pack_int4_official(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values int8 [out, in] (in even, values in [-8, 7]) -> int8 [out, in/2].

    Layout of THUDM's ``compress_int4_weight``: byte j = (q[2j] << 4) | (q[2j+1] & 0xF).
    """
    q = q.to(torch.int8)
    return (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)  # [out, in/2]


def unpack_int4_official(packed: torch.Tensor) -> torch.Tensor:
    """Unpack official int4 bytes int8 [out, in/2] -> int8 [out, in] with values in [-8, 7].

    Arithmetic (sign-extending) shifts on int8: high = t >> 4, low = (t << 4) >> 4.
    """
    if packed.dtype != torch.int8:
        raise ValueError(f"official int4 weights are int8, got {packed.dtype}")
    high = packed >> 4  # [out, in/2], column 2j
    low = (packed << 4) >> 4  # [out, in/2], column 2j+1 (int8 << wraps, then sign-extends)
    return torch.stack((high, low), dim=-1).flatten(-2)  # [out, in]


def dequantize_int4_official(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference official int4 dequantization: ``float32(unpack(packed)) * float32(scale)``."""
    if packed.dtype != torch.int8:
        raise ValueError(f"official int4 weights are int8, got {packed.dtype}")
    out_f, half = packed.shape
    # Same nibbles as unpack_int4_official, written straight into the float result.
    w = torch.empty(out_f, 2 * half, dtype=torch.float32, device=packed.device)  # [out, in]
    w[:, 0::2] = packed >> 4
    w[:, 1::2] = (packed << 4) >> 4
    w.mul_(scale.float()[:, None])
    return w.to(dtype)


def quantize_int4_grouped(
    w: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """localglm's asymmetric group-wise int4 (min/max per group of ``group_size`` columns).

    Returns ``(packed, scales, zeros)``:
    packed uint8 [out, ceil(in/2)] (high nibble = even column, values 0..15; an odd last column
    is paired with a 0 nibble), scales and zeros bfloat16 [out, ceil(in/group_size)].
    Dequantized weight = (q - 8) * scale + zero (see `dequantize_int4_grouped`).
    A last, partial group (in % group_size != 0) uses the statistics of its real columns only.
    Computed in float32 whatever the input dtype.
    """
    _check_2d(w, "quantize_int4_grouped")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    out_f, in_f = w.shape
    n_groups = math.ceil(in_f / group_size)
    w = w.detach().float()  # [out, in]
    pad = n_groups * group_size - in_f
    if pad:
        # Repeating the last column leaves every group's min/max unchanged.
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)  # [out, G*g]
    wg = w.view(out_f, n_groups, group_size)  # [out, G, g]
    lo = wg.amin(dim=-1)  # [out, G]
    hi = wg.amax(dim=-1)  # [out, G]
    # Round scale and zero to their stored dtype first, then pick q against the rounded values,
    # so the stored triple is self-consistent (q never relies on precision we do not keep).
    scale = ((hi - lo) / 15).to(_LOCAL_SCALE_DTYPE)  # [out, G]
    s32 = scale.float()
    zero = (lo + 8 * s32).to(_LOCAL_SCALE_DTYPE)  # [out, G]; weight at q = 8
    safe = torch.where(s32 == 0, torch.ones_like(s32), s32)  # constant group: q = 8 -> zero
    q = torch.round((wg - zero.float()[..., None]) / safe[..., None]) + 8  # [out, G, g]
    q = q.clamp_(0, 15).to(torch.uint8).view(out_f, -1)[:, :in_f]  # [out, in]
    return _pack_uint4(q), scale, zero


def _pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] values 0..15 -> uint8 [out, ceil(in/2)], high nibble = even column."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))  # [out, in+1]
    return (q[:, 0::2] << 4) | q[:, 1::2]  # [out, ceil(in/2)]


def unpack_int4_grouped(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, ceil(in/2)] -> uint8 [out, in_features] with values 0..15."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"localglm int4 weights are uint8, got {packed.dtype}")
    q = torch.stack((packed >> 4, packed & 0x0F), dim=-1).flatten(-2)  # [out, 2*ceil(in/2)]
    return q[:, :in_features]


def dequantize_int4_grouped(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference localglm int4 dequantization: ``(q - 8) * scale + zero`` in float32."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"localglm int4 weights are uint8, got {packed.dtype}")
    out_f, half = packed.shape
    n_groups = scales.shape[1]
    width = max(2 * half, n_groups * group_size)  # room for the padded last group / nibble
    w = torch.empty(out_f, width, dtype=torch.float32, device=packed.device)  # [out, width]
    w[:, 0 : 2 * half : 2] = packed >> 4
    w[:, 1 : 2 * half : 2] = packed & 0x0F
    wg = w[:, : n_groups * group_size].view(out_f, n_groups, group_size)  # [out, G, g]
    # In place, one op at a time: the same fp32 roundings as (q - 8) * s + z.
    wg.sub_(8).mul_(scales.float()[..., None]).add_(zeros.float()[..., None])
    return w[:, :in_features].to(dtype)


# ---------------------------------------------------------------------------------------------
# Kernel layouts (derived, never saved)
# ---------------------------------------------------------------------------------------------


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _unpack_uint4_int32(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] (high nibble = even column) -> int32 [N, K], what the CPU
    converter takes. Written straight into int32 (2-3x faster than stack + cast)."""
    n, half = packed.shape
    q = torch.empty(n, 2 * half, dtype=torch.int32, device=packed.device)  # [N, 2*half]
    q[:, 0::2] = packed >> 4
    q[:, 1::2] = packed & 0x0F
    return q[:, :in_features]


def _int4_kernel_layout(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Build the int4 kernel operands from unsigned q and per-group scales/zeros.

    q: int32 [N, K] values 0..15 (weight = (q - 8) * scale + zero); scales, zeros: [N, G].
    Pads K to a multiple of group_size (the padded x columns are zero, so q there is moot) and
    N to a multiple of 16 (zero-scale rows, sliced off after the call).
    Returns (packed, scales_and_zeros [K_pad/g, N_pad, 2] in dtype, K_pad).
    """
    n, k = q.shape
    n_groups = scales.shape[1]
    k_pad = n_groups * group_size
    n_pad = _round_up(n, 16)
    if (k_pad, n_pad) != (k, n):
        q = F.pad(q, (0, k_pad - k, 0, n_pad - n), value=8)  # [N_pad, K_pad]
    if zeros is None:
        zeros = torch.zeros_like(scales)
    sz = torch.stack((scales, zeros), dim=-1).to(dtype)  # [N, G, 2]
    sz = F.pad(sz, (0, 0, 0, 0, 0, n_pad - n))  # [N_pad, G, 2]
    sz = sz.transpose(0, 1).contiguous()  # [G, N_pad, 2]
    if q.device.type == "cuda":
        # The CUDA converter takes pre-packed uint8 [N, K/2] (high nibble = even column).
        u8 = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)  # [N_pad, K_pad/2]
        inner_k_tiles = next(t for t in (8, 4, 2) if k_pad % (t * 16) == 0)
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles)
    else:
        # innerKTiles is ignored by the CPU converter; 2 is the smallest legal value.
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    return packed, sz, k_pad


def _int4_kernel_mm(
    x2: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor
) -> torch.Tensor:
    if x2.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)


# ---------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------


def _check_config(
    in_features: int, out_features: int, bits: int, group_size: int, fmt: str
) -> None:
    shape = f"[out={out_features}, in={in_features}]"
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits} (layer {shape})")
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {FORMATS}, got {fmt!r}")
    if group_size and bits == 8:
        raise ValueError(
            f"int8 is per-row only (group_size 0), got group_size {group_size} (layer {shape})"
        )
    if group_size and group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"int4 group_size {group_size} is not supported for layer {shape}; allowed: 0 (one "
            f"scale per row) or {', '.join(map(str, INT4_GROUP_SIZES))} (the sizes PyTorch's "
            "int4 kernels accept)"
        )
    if group_size and fmt == "official":
        raise ValueError(
            f"the official format has one scale per row; group_size {group_size} needs "
            "format 'localglm'"
        )
    if bits == 4 and not group_size and in_features % 2:
        raise ValueError(
            f"per-row int4 (official layout) packs two columns per byte and needs an even "
            f"in_features, got layer {shape}; use group_size "
            f"{'/'.join(map(str, INT4_GROUP_SIZES))} instead"
        )


class QuantizedLinear(nn.Module):
    """Weight-only int8/int4 linear. Same call signature as nn.Linear.

    Buffers (saved by ``state_dict``):

    * ``weight``: int8 [out, in] (bits 8), int8 [out, in/2] (bits 4, group_size 0: official
      packed nibbles) or uint8 [out, ceil(in/2)] (bits 4, group_size > 0: localglm nibbles);
    * ``weight_scale``: float16 [out] (per row) or bfloat16 [out, ceil(in/group_size)];
    * ``weight_zero``: bfloat16 [out, ceil(in/group_size)], group-wise int4 only;
    * ``bias`` (a frozen Parameter, like nn.Linear's) [out], or None.

    With group_size 0 the key names, shapes and dtypes are those of THUDM's int8/int4
    checkpoints, so their tensors load unchanged. ``weight_scale``/``weight_zero`` keep their
    dtype when the module is cast (``model.to(torch.bfloat16)`` would otherwise round the fp16
    scales); the bias follows the model dtype like any parameter.
    """

    # CPU calls with at least this many rows (tokens) skip the kernels and run
    # forward_reference (dequantize to fp32 + fp32 GEMM); None = no limit. Measured on AVX2,
    # torch 2.13, 2 threads (benchmarks/bench_linear.py): the bf16 kernels are 3-5x faster at
    # 32 rows, even at 256, and the fp32 path is 1.5x faster at 1000 rows.
    cpu_dequant_min_rows: int | None = 257
    # Largest row count for which the CPU kernel is used, per activation dtype (None = any;
    # dtype absent = never). The fp32/fp16 kernels are exact but scalar here and beat the
    # reference only for 1-2 rows (decode).
    cpu_kernel_max_rows: dict[torch.dtype, int | None] = {
        torch.bfloat16: None,
        torch.float32: 2,
        torch.float16: 2,
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 0,
        bias: bool = True,
        *,
        fmt: str = "localglm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Empty (zero-filled) layer; fill it with `load_state_dict` or use the constructors.

        ``dtype`` is the dtype of the bias only (the weights have fixed integer dtypes).
        """
        super().__init__()
        _check_config(in_features, out_features, bits, group_size, fmt)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        if bits == 8:
            w_shape, w_dtype = (out_features, in_features), torch.int8
        elif not group_size:
            w_shape, w_dtype = (out_features, in_features // 2), torch.int8
        else:
            w_shape, w_dtype = (out_features, (in_features + 1) // 2), torch.uint8
        self.register_buffer("weight", torch.zeros(w_shape, dtype=w_dtype, device=device))
        if group_size:
            s_shape = (out_features, math.ceil(in_features / group_size))
            s_dtype = _LOCAL_SCALE_DTYPE
        else:
            s_shape, s_dtype = (out_features,), torch.float16
        self.register_buffer("weight_scale", torch.zeros(s_shape, dtype=s_dtype, device=device))
        if group_size:
            self.register_buffer("weight_zero", torch.zeros(s_shape, dtype=s_dtype, device=device))
        if bias:
            b = torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
            self.bias = nn.Parameter(b, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # (device, dtype) -> kernel operands; derived from the buffers, never saved.
        self._kernel_cache: dict[tuple[torch.device, torch.dtype], tuple] = {}

    @property
    def fmt(self) -> str:
        """Stored layout: 'official' (one scale per row) or 'localglm' (group-wise int4)."""
        return "localglm" if self.group_size else "official"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 0) -> QuantizedLinear:
        """Quantize an nn.Linear. group_size 0 uses THUDM's per-row recipe (bit-identical to
        their int8/int4 checkpoints); group_size 32/64/128/256 (int4 only) the localglm
        group-wise format."""
        w = linear.weight.detach()  # [out, in]
        out_f, in_f = w.shape
        fmt = "localglm" if group_size else "official"
        _check_config(in_f, out_f, bits, group_size, fmt)
        # Built on meta so no zero-filled buffers are allocated only to be replaced.
        m = cls(in_f, out_f, bits, group_size, linear.bias is not None, fmt=fmt, device="meta")
        if bits == 8:
            m.weight, m.weight_scale = quantize_int8_official(w)
        elif not group_size:
            m.weight, m.weight_scale = quantize_int4_official(w)
        else:
            m.weight, m.weight_scale, m.weight_zero = quantize_int4_grouped(w, group_size)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def from_official(
        cls,
        weight_int8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
    ) -> QuantizedLinear:
        """Wrap THUDM's stored tensors as they are (no copy, no rounding: lossless).

        weight_int8: int8 [out, in] (bits 8) or [out, in/2] (bits 4); weight_scale [out]
        (float16 in their checkpoints); bias [out] or None.
        """
        if bits not in (4, 8):
            raise ModelFormatError(f"quantization_bit must be 4 or 8, got {bits}")
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ModelFormatError(
                f"official int{bits} weight must be a 2-D int8 tensor, got "
                f"{weight_int8.dtype} {tuple(weight_int8.shape)}"
            )
        out_f = weight_int8.shape[0]
        in_f = weight_int8.shape[1] * (2 if bits == 4 else 1)
        if tuple(weight_scale.shape) != (out_f,) or not weight_scale.is_floating_point():
            raise ModelFormatError(
                f"weight_scale must be a float tensor of shape [{out_f}], got "
                f"{weight_scale.dtype} {tuple(weight_scale.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ModelFormatError(f"bias must have shape [{out_f}], got {tuple(bias.shape)}")
        m = cls(in_f, out_f, bits, 0, bias is not None, fmt="official", device="meta")
        m.weight = weight_int8
        m.weight_scale = weight_scale
        if bias is not None:
            m.bias = nn.Parameter(bias, requires_grad=False)
        return m

    # -- reference ------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] the stored tensors represent (computed in float32)."""
        if self.bits == 8:
            return dequantize_int8(self.weight, self.weight_scale, dtype)
        if not self.group_size:
            return dequantize_int4_official(self.weight, self.weight_scale, dtype)
        return dequantize_int4_grouped(
            self.weight,
            self.weight_scale,
            self.weight_zero,
            self.group_size,
            self.in_features,
            dtype,
        )

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then F.linear (differentiable w.r.t. x).

        On CPU, bf16/fp16 inputs are computed in float32 (the result is cast back): fp32 GEMM
        is both exact and, without native bf16 units, 4-6x faster than bf16 GEMM. Otherwise
        (fp32/fp64 inputs, other devices) the weight is dequantized to x's dtype.
        """
        half = x.dtype in (torch.bfloat16, torch.float16)
        compute = torch.float32 if half and x.device.type == "cpu" else x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return F.linear(x.to(compute), self.dequantize(compute), bias).to(x.dtype)

    # -- fast path ------------------------------------------------------------------------

    def kernel_fits(self, x: torch.Tensor) -> bool:
        """Whether `forward_kernel` can run on x (device, dtype and, for int8, shape)."""
        dev = x.device.type
        if dev == "cpu":
            if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return False
            if self.bits == 8 and x.dtype != torch.float32:
                # AVX2 bf16 int8 kernel reads past the row end unless K % 8 == 0; 32 also
                # covers wider vector paths we could not test.
                return self.in_features % 32 == 0
            return True
        if dev == "cuda":
            # int4: tinygemm, bf16 activations only. int8: PyTorch's CUDA int8 kernel is a
            # naive fp32-only loop, slower than dequantize + cuBLAS, so it is never used.
            return self.bits == 4 and x.dtype == torch.bfloat16 and _HAS_CUDA_INT4
        return False

    def prepare(self, dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
        """Build (and cache) the kernel layout for activations of ``dtype`` on this device.

        Done automatically on the first fast forward; call it ahead to move the one-off
        repacking cost out of the first generated token.
        """
        self._kernel_operands(self.weight.device, dtype)
        return self

    def _kernel_operands(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (device, dtype)
        ops = self._kernel_cache.get(key)
        if ops is not None:
            return ops
        with torch.no_grad():
            if self.bits == 8:
                # Kernel uses the stored int8 matrix as is; only the scales change dtype
                # (fp16 -> bf16 rounds them by <= 2^-8 relative, bf16's unit roundoff).
                ops = (self.weight.contiguous(), self.weight_scale.to(dtype))
            elif not self.group_size:
                # Signed nibble s -> s + 8 is s XOR 8 per nibble: unsigned 1..15, zero = 0.
                u = self.weight.view(torch.uint8) ^ 0x88  # [N, K/2]
                q = _unpack_uint4_int32(u, self.in_features)  # [N, K]
                g = OFFICIAL_INT4_KERNEL_GROUP
                n_groups = math.ceil(self.in_features / g)
                scales = self.weight_scale[:, None].expand(-1, n_groups)  # [N, G]: row scale
                ops = _int4_kernel_layout(q, scales, None, g, dtype) + (g,)
            else:
                q = _unpack_uint4_int32(self.weight, self.in_features)  # [N, K] 0..15
                ops = _int4_kernel_layout(
                    q, self.weight_scale, self.weight_zero, self.group_size, dtype
                ) + (self.group_size,)
        self._kernel_cache[key] = ops
        return ops

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """Native int8/int4 kernel (raises ValueError when `kernel_fits` is False)."""
        if not self.kernel_fits(x):
            raise ValueError(
                f"no native int{self.bits} kernel for {x.dtype} input on {x.device} "
                f"(layer [out={self.out_features}, in={self.in_features}])"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        ops = self._kernel_operands(x.device, x.dtype)
        if self.bits == 8:
            w, scale = ops
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w, scale)  # [M, N]
        else:
            packed, sz, k_pad, g = ops
            if k_pad != self.in_features:
                x2 = F.pad(x2, (0, k_pad - self.in_features))  # [M, K_pad], zero columns
            y = _int4_kernel_mm(x2.contiguous(), packed, g, sz)  # [M, N_pad]
            y = y[:, : self.out_features]  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Native kernel when one fits (device, dtype, shape, row count), else
        `forward_reference`. Differentiable w.r.t. x (and a trainable bias) without keeping a
        dequantized weight alive for backward."""
        if torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            return _QuantizedLinearFn.apply(x, self.bias, self)
        return self._forward_no_grad(x)

    def use_kernel(self, x: torch.Tensor) -> bool:
        """Whether forward() takes the native kernel for this input (policy above)."""
        if not self.kernel_fits(x):
            return False
        if x.device.type != "cpu":
            return True
        rows = x.numel() // self.in_features
        if self.cpu_dequant_min_rows is not None and rows >= self.cpu_dequant_min_rows:
            return False
        if x.dtype not in self.cpu_kernel_max_rows:
            return False
        limit = self.cpu_kernel_max_rows[x.dtype]
        return limit is None or rows <= limit

    def _forward_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_kernel(x) if self.use_kernel(x) else self.forward_reference(x)

    # -- housekeeping ---------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Moving/casting invalidates the kernel layout. Scales keep their dtype: they are part
        # of the stored format, and e.g. fp16 -> bf16 would lose precision.
        self._kernel_cache = {}
        kept = {
            n: self._buffers[n].dtype
            for n in ("weight_scale", "weight_zero")
            if self._buffers.get(n) is not None
        }
        before = {n: self._buffers[n] for n in kept}
        super()._apply(fn, recurse)
        for n, dt in kept.items():
            new = self._buffers[n]
            if new.dtype != dt:
                self._buffers[n] = before[n].to(device=new.device)
        return self

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._kernel_cache = {}
        w = state_dict.get(prefix + "weight")
        expect = torch.uint8 if self.group_size else torch.int8
        if w is not None and w.dtype != expect:
            error_msgs.append(
                f"{prefix}weight: int{self.bits} group_size {self.group_size} weights are "
                f"{expect}, the checkpoint has {w.dtype} (wrong quantization_bit/format?)"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _QuantizedLinearFn(torch.autograd.Function):
    """y = layer(x) with a backward that dequantizes the weight again instead of saving it:
    autograd would otherwise keep one float copy of every quantized weight until backward
    (LoRA training over a quantized model)."""

    @staticmethod
    def forward(ctx, x, bias, layer):  # grad mode is off in here: kernels are allowed
        ctx.layer = layer
        return layer._forward_no_grad(x)

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            half = grad.dtype in (torch.bfloat16, torch.float16)
            compute = torch.float32 if half and grad.device.type == "cpu" else grad.dtype
            w = layer.dequantize(compute)  # [out, in]
            grad_x = (grad.to(compute) @ w).to(grad.dtype)  # [..., in]
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(layer.bias.dtype)  # [out]
        return grad_x, grad_b, None


# ---------------------------------------------------------------------------------------------
# Whole-model helpers
# ---------------------------------------------------------------------------------------------


def _matching_linears(
    model: nn.Module, names: Iterable[str]
) -> list[tuple[nn.Module, str, nn.Linear]]:
    names = tuple(names)
    found = []
    for qual, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(qual == n or qual.endswith("." + n) for n in names):
            parent_name, _, child = qual.rpartition(".")
            found.append((model.get_submodule(parent_name), child, mod))
    return found


def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int = 0,
    *,
    names: Iterable[str] = QUANTIZED_LINEAR_NAMES,
) -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name ends with one of ``names``
    by `QuantizedLinear.from_linear` (group_size 0: official per-row layout). Returns model.

    The float weights are released as each layer is swapped, so peak memory grows by one
    layer, not by the whole model.
    """
    for parent, child, linear in _matching_linears(model, names):
        setattr(parent, child, QuantizedLinear.from_linear(linear, bits, group_size))
    return model


def make_quantized_skeleton(
    model_on_meta: nn.Module,
    bits: int,
    group_size: int = 0,
    fmt: str = "official",
    *,
    names: Iterable[str] = QUANTIZED_LINEAR_NAMES,
) -> nn.Module:
    """Swap the matching nn.Linear children for empty QuantizedLinear modules (in place).

    The result accepts a state dict in the stored format -- THUDM's int8/int4 checkpoints for
    fmt 'official', localglm's own files for 'localglm' -- via
    ``model.load_state_dict(sd, assign=True)``. Config fields: ``quantization_bit`` -> bits,
    ``quantization_group_size`` -> group_size, ``quantization_format`` -> fmt.
    """
    if fmt == "official" and group_size:
        raise ValueError("quantization_format 'official' has no groups (group_size must be 0)")
    for parent, child, linear in _matching_linears(model_on_meta, names):
        bias_dtype = linear.bias.dtype if linear.bias is not None else None
        q = QuantizedLinear(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            linear.bias is not None,
            fmt=fmt,
            device=linear.weight.device,
            dtype=bias_dtype,
        )
        setattr(parent, child, q)
    return model_on_meta
