"""Preallocated key/value cache, grown in large steps up to a fixed budget and then reused."""

from __future__ import annotations

import torch

from .errors import ContextTooLongError


class KVCache:
    """Keys and values of every layer, shape (B, nh, capacity, hd) each.

    Storage grows in ``step``-sized chunks up to ``max_len`` slots (so a short chat does not
    reserve the whole context), and is reused across calls: ``reset`` only forgets the length.
    Each layer may live on its own device (models split over several GPUs).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, devices, step: int = 256):
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.devices = list(devices) if isinstance(devices, (list, tuple)) else \
            [torch.device(devices)] * num_layers
        self.step = step
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0  # slots holding valid keys (prefix included)

    def reset(self, batch_size: int | None = None):
        """Forget the contents; storage is kept when the batch size is unchanged."""
        if batch_size is not None and batch_size != self.batch_size:
            self.batch_size = batch_size
            self.capacity = 0
            self.k, self.v = [], []
        self.length = 0

    def reserve(self, n: int):
        """Make room for ``n`` slots in total (rounded up to the step, capped at max_len)."""
        if n > self.max_len:
            raise ContextTooLongError(
                f"{n} tokens do not fit the context of {self.max_len} tokens")
        if n <= self.capacity:
            return
        new_cap = min(self.max_len, -(-n // self.step) * self.step)
        shape = (self.batch_size, self.num_heads, new_cap, self.head_dim)
        k_new, v_new = [], []
        for i in range(self.num_layers):
            k = torch.empty(shape, dtype=self.dtype, device=self.devices[i])
            v = torch.empty(shape, dtype=self.dtype, device=self.devices[i])
            if self.capacity:
                k[:, :, : self.length] = self.k[i][:, :, : self.length]
                v[:, :, : self.length] = self.v[i][:, :, : self.length]
            k_new.append(k)
            v_new.append(v)
        self.k, self.v = k_new, v_new
        self.capacity = new_cap

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hd) at slots [start, start+T); return all valid keys/values."""
        end = start + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == self.num_layers - 1:
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def load_prefix(self, prefix_kv: torch.Tensor):
        """Put P-Tuning prefix keys/values (layers, 2, B, nh, P, hd) in the first slots."""
        p = prefix_kv.shape[4]
        self.reserve(p)
        for i in range(self.num_layers):
            self.k[i][:, :, :p] = prefix_kv[i, 0].to(self.k[i].device)
            self.v[i][:, :, :p] = prefix_kv[i, 1].to(self.v[i].device)
        self.length = p

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
