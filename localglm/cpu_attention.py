"""Attention of one new token per row over a bf16 KV cache on the CPU, compiled by numba.

A decode step's query sees every cached key of its row (the prefix slots of P-Tuning v2, then
its tokens from the end of its left padding on), so no mask is needed: the kernel reads each
key and value once, in the cache's dtype, and converts to float32 in registers. PyTorch's
scaled_dot_product_attention on a bf16 cache is slow without native bf16 arithmetic (AVX2):
measured +75 % per token after a 1000-token prompt on a Zen 3 CPU, most of it there.

Scores, softmax and the weighted sum are float32; the result is rounded once to bf16, as
PyTorch's kernel does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .quantize import cpu_kernels

__all__ = ["decode_attention", "usable"]

if cpu_kernels.HAVE_NUMBA:
    from numba import njit, prange

    from .quantize.cpu_kernels import _bf16

    @njit(parallel=True, cache=True, fastmath=True)
    def _attend(q, k, v, prefix, lo, hi, scale, out):
        """q float32 [B, H, D]; k, v bf16 bits [B, H, S, D] (the whole cache); row b sees
        slots [0, prefix) and [lo[b], hi[b]); out float32 [B, H, D]."""
        nb, nh, d = q.shape
        for t in prange(nb * nh):
            b, h = t // nh, t % nh
            n = prefix + hi[b] - lo[b]
            s = np.empty(n, np.float32)
            qv = q[b, h]
            best = np.float32(-np.inf)
            for i in range(n):
                kr = k[b, h, i if i < prefix else lo[b] + i - prefix]
                acc = np.float32(0.0)
                for c in range(d):
                    acc += qv[c] * _bf16(kr[c])
                s[i] = acc * scale
                best = max(best, s[i])
            total = np.float32(0.0)
            for i in range(n):
                s[i] = np.exp(s[i] - best)
                total += s[i]
            o = np.zeros(d, np.float32)
            for i in range(n):
                vr = v[b, h, i if i < prefix else lo[b] + i - prefix]
                p = s[i] / total
                for c in range(d):
                    o[c] += p * _bf16(vr[c])
            out[b, h] = o


def usable(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernel takes this call: CPU, one query per row, a bf16 cache."""
    return (cpu_kernels.supported() and q.device.type == "cpu" and q.shape[2] == 1
            and keys.dtype == torch.bfloat16 and q.dtype == keys.dtype)


def _bits(t: torch.Tensor) -> np.ndarray:
    """The bf16 bits of the cache tensor that ``t`` (its first slots) is a view of."""
    b, h, _, d = t.shape
    whole = t.as_strided((b, h, t.stride(1) // d, d), t.stride())
    if not whole.is_contiguous():
        whole = t.contiguous()
    return whole.view(torch.int16).numpy().view(np.uint16)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     prefix: int, lo: list[int], hi: list[int]) -> torch.Tensor:
    """q (B, H, 1, D); keys, values (B, H, S, D) from the cache; row b attends to slots
    [0, prefix) and [lo[b], hi[b]). Returns (B, H, 1, D) in q's dtype."""
    b, h, _, d = q.shape
    qf = q.detach()[:, :, 0].float().contiguous().numpy()
    out = np.empty((b, h, d), np.float32)
    cpu_kernels.sync_threads()
    _attend(qf, _bits(keys), _bits(values), prefix, np.asarray(lo, np.int64),
            np.asarray(hi, np.int64), np.float32(1.0 / math.sqrt(d)), out)
    return torch.from_numpy(out).to(q.dtype)[:, :, None]
