"""PyTorch's own weight-only kernels (``_weight_int4pack_mm*``, ``_weight_int8pack_mm``).

Used on CUDA (int4, bf16 activations) and on CPUs where the numba kernels cannot run. Their
operands are a repacked copy of the stored weight, built on first use and never saved.

Facts measured on torch 2.13.0+cpu:

* ``_weight_int4pack_mm_for_cpu(x[M,K], packed, group, scales_and_zeros[K/group, N, 2])``
  computes ``x @ ((q - 8) * scale + zero).T``; ``zero`` is a float offset, not an integer
  zero-point. Group must be 32/64/128/256 and divide K; N % 16 == 0; x must be 2-D and
  contiguous; scales_and_zeros must have x's dtype.
* ``_weight_int8pack_mm(x[M,K], int8 [N,K], scales[N])``: scales must have x's dtype. With
  bf16 x it reads out of bounds unless K % 8 == 0 on AVX2, so K % 32 == 0 is required for
  the reduced-precision dtypes.
* Only bf16 activations are vectorized on CPU; PyTorch's CUDA int8 kernel is a naive fp32
  loop, slower than dequantize + cuBLAS, so only the int4 kernel is used there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Group size used to run per-row (official) int4 weights through the group-wise kernel: every
# group gets the row's scale, so any size is lossless.
OFFICIAL_INT4_KERNEL_GROUP = 128
HAS_CUDA_INT4 = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "aten::_weight_int4pack_mm", "CUDA"
)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def unpack_uint4_int32(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] (high nibble = even column) -> int32 [N, K], what the CPU
    converter takes. Written straight into int32 (2-3x faster than stack + cast)."""
    n, half = packed.shape
    q = torch.empty(n, 2 * half, dtype=torch.int32, device=packed.device)  # [N, 2*half]
    q[:, 0::2] = packed >> 4
    q[:, 1::2] = packed & 0x0F
    return q[:, :in_features]


def int4_kernel_layout(
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


def int4_kernel_mm(
    x2: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor
) -> torch.Tensor:
    if x2.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)


