"""Preallocated key/value cache, grown in large steps up to a fixed budget and then reused.

A cache belongs to one generation at a time: ``borrow()`` marks it in use, and a second
generation that tries to borrow it meanwhile gets a ``CacheBusyError`` instead of silently
overwriting the first one's keys. A batch cache's rows can be handed out separately
(``rows``), so that sequences of different lengths share one allocation (continuous batching).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ContextTooLongError, LocalGLMError


class CacheBusyError(LocalGLMError):
    """A KV cache that another, unfinished generation is using."""


class KVCache:
    """Keys and values of every layer, shape (B, nh, capacity, hd) each.

    Storage grows in ``step``-sized chunks up to ``max_len`` slots (so a short chat does not
    reserve the whole context), and is reused across calls: ``reset`` only forgets the length.
    New storage is zeroed, so slots a row never wrote are finite (masked slots must not turn
    an attention output into NaN). Each layer may live on its own device (models split over
    several GPUs).
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
        self.busy = False  # borrowed by a generation that has not finished

    @contextlib.contextmanager
    def borrow(self):
        """Hold the cache for one generation; raises ``CacheBusyError`` if another holds it."""
        if self.busy:
            raise CacheBusyError(
                "this KV cache is in use by another generation that has not finished; give "
                "each concurrent generation its own cache (new_cache), or finish or close "
                "the other one first")
        self.busy = True
        try:
            yield self
        finally:
            self.busy = False

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
        # Keep every old slot: rows of a batch cache have their own lengths, and a prefill
        # run layer group by layer group has written slots past ``length`` in some layers.
        keep = self.capacity
        k_new, v_new = [], []
        for i in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.devices[i])
            v = torch.zeros(shape, dtype=self.dtype, device=self.devices[i])
            if self.capacity:
                k[:, :, :keep] = self.k[i][:, :, :keep]
                v[:, :, :keep] = self.v[i][:, :, :keep]
            k_new.append(k)
            v_new.append(v)
        self.k, self.v = k_new, v_new
        self.capacity = new_cap

    def update(self, layer: int, start: int | list[int], k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nh, T, hd) at slots [start, start+T); return all valid keys/values.

        ``start`` is one slot for every row, or one slot per row (rows of different lengths);
        the keys returned then reach the longest row's end (the caller masks the rest).
        """
        return self.rows(0, k.shape[0]).update(layer, start, k, v)

    def rows(self, lo: int, hi: int) -> CacheRows:
        """Rows [lo, hi) as a cache of their own; writes land in this cache's storage."""
        return CacheRows(self, lo, hi)

    def move_row(self, src: int, dst: int, n: int):
        """Copy the first ``n`` slots of row ``src`` to row ``dst`` (packing a batch)."""
        for i in range(self.num_layers):
            self.k[i][dst, :, :n] = self.k[i][src, :, :n]
            self.v[i][dst, :, :n] = self.v[i][src, :, :n]

    def load_prefix(self, prefix_kv: torch.Tensor):
        """Put P-Tuning prefix keys/values (layers, 2, B, nh, P, hd) in the first slots."""
        self.rows(0, self.batch_size).load_prefix(prefix_kv)
        self.length = max(self.length, prefix_kv.shape[4])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CacheRows:
    """A window of rows [lo, hi) of a ``KVCache``, with the cache interface the model uses.

    It indexes the parent's storage on every call, so it stays valid when the parent grows.
    """

    def __init__(self, cache: KVCache, lo: int, hi: int):
        self.cache, self.lo, self.hi = cache, lo, hi
        self.dtype = cache.dtype
        self.num_layers = cache.num_layers

    def update(self, layer: int, start: int | list[int], k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        t = k.shape[2]
        starts = [start] * (self.hi - self.lo) if isinstance(start, int) else list(start)
        end = max(starts) + t
        if end > c.capacity:
            c.reserve(end)
        ck, cv = c.k[layer], c.v[layer]
        if isinstance(start, int):
            ck[self.lo:self.hi, :, start:end] = k
            cv[self.lo:self.hi, :, start:end] = v
        else:
            for r, s in enumerate(starts):
                ck[self.lo + r, :, s:s + t] = k[r]
                cv[self.lo + r, :, s:s + t] = v[r]
        if layer == c.num_layers - 1:
            c.length = max(c.length, end)
        return ck[self.lo:self.hi, :, :end], cv[self.lo:self.hi, :, :end]

    def load_prefix(self, prefix_kv: torch.Tensor):
        """Put P-Tuning prefix keys/values (layers, 2, B, nh, P, hd) in these rows' first
        slots (B is 1 or the number of rows)."""
        c = self.cache
        p = prefix_kv.shape[4]
        c.reserve(p)
        for i in range(c.num_layers):
            c.k[i][self.lo:self.hi, :, :p] = prefix_kv[i, 0].to(c.k[i].device)
            c.v[i][self.lo:self.hi, :, :p] = prefix_kv[i, 1].to(c.v[i].device)
