"""Stored int8/int4 formats: pure quantize / pack / dequantize primitives (the reference).

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUANTIZED_LINEAR_NAMES = (
    "attention.query_key_value",
    "attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
# Group sizes of the localglm int4 format (also what PyTorch's int4 kernels accept).
INT4_GROUP_SIZES = (32, 64, 128, 256)
# int4 groups when quantizing a float checkpoint: 128 reads 25 % fewer bytes per token than 32
# (bf16 scales and zeros) for ~1.3x the output error; 32 stays available (--group-size 32).
DEFAULT_GROUP_SIZE = 128
FORMATS = ("official", "localglm")
# Buffers that keep their stored dtype whatever the compute dtype (casting would round them).
SCALE_SUFFIXES = ("weight_scale", "weight_zero")
LOCAL_SCALE_DTYPE = torch.bfloat16  # localglm int4 scales/zeros


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
    scale = ((hi - lo) / 15).to(LOCAL_SCALE_DTYPE)  # [out, G]
    s32 = scale.float()
    zero = (lo + 8 * s32).to(LOCAL_SCALE_DTYPE)  # [out, G]; weight at q = 8
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


