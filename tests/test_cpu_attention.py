"""The CPU decode-attention kernel: one query per row over a bf16 cache."""

import pytest
import torch
import torch.nn.functional as F

from localglm import cpu_attention
from localglm.quantize import cpu_kernels

pytestmark = [pytest.mark.reduced_precision,
              pytest.mark.skipif(not cpu_kernels.supported(),
                                 reason="the CPU kernels need numba and AVX2")]


def test_matches_float32_attention_over_the_visible_slots():
    """Rows with a prefix, left padding and different lengths: the kernel's result is the
    float32 attention over exactly the slots each row sees, rounded once to the cache dtype
    (|error| <= one rounding of the output plus 1e-5 of float32 summation)."""
    torch.manual_seed(0)
    dtype, unit = torch.bfloat16, 2.0 ** -8
    b, h, s, d = 3, 4, 70, 128
    keys = (torch.randn(b, h, s, d) * 2).to(dtype)
    values = torch.randn(b, h, s, d).to(dtype)
    q = (torch.randn(b, h, 1, d) * 2).to(dtype)
    prefix, lo, hi = 2, [2, 9, 2], [61, 70, 3]  # the last row sees the prefix and one token
    # the cache holds 90 slots; the call gets the first 70 (as a decode step does)
    keys = torch.cat([keys, torch.full((b, h, 20, d), float("nan"), dtype=dtype)], 2)
    values = torch.cat([values, torch.full((b, h, 20, d), float("nan"), dtype=dtype)], 2)
    out = cpu_attention.decode_attention(q, keys[:, :, :70], values[:, :, :70], prefix, lo, hi)
    assert out.shape == (b, h, 1, d) and out.dtype == dtype
    for r in range(b):
        seen = list(range(prefix)) + list(range(lo[r], hi[r]))
        ref = F.scaled_dot_product_attention(q[r:r + 1].float(), keys[r:r + 1, :, seen].float(),
                                             values[r:r + 1, :, seen].float())
        err = (out[r:r + 1].float() - ref).abs()
        assert (err <= ref.abs() * unit + 1e-5).all(), float(err.max())


def test_taken_only_for_one_query_over_a_bf16_cache():
    q = torch.zeros(1, 2, 1, 128, dtype=torch.bfloat16)
    assert cpu_attention.usable(q, q)
    assert not cpu_attention.usable(q.float(), q.float())  # float32: PyTorch's exact path
    assert not cpu_attention.usable(q.half(), q.half())
    two = torch.zeros(1, 2, 2, 128, dtype=torch.bfloat16)
    assert not cpu_attention.usable(two, two)  # a prompt
