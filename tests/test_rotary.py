"""The 2-D rotary embedding: the same values as the official per-half formula."""

import pytest
import torch

from localglm import model as model_mod


def official_rotary(x, cos_sin_pos, cos_sin_block):
    """ChatGLM-6B's apply_rotary_pos_emb_index on each half of the head, as written there:
    x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)."""
    def rotate_half(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)

    x1, x2 = x.chunk(2, dim=-1)
    (c1, s1), (c2, s2) = cos_sin_pos, cos_sin_block
    return torch.cat((x1 * c1 + rotate_half(x1) * s1, x2 * c2 + rotate_half(x2) * s2), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_equals_the_official_formula_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    b, t, nh, hd = 2, 5, 3, 32
    table = model_mod.RotaryTable(hd // 2, 16)  # grows past 16 on demand
    pos = torch.randint(0, 40, (b, 2, t), generator=g)
    x = torch.randn(b, t, nh, hd, generator=g).to(dtype)
    rope = model_mod.rotary_2d(table, pos, dtype)  # (B, T, 1, 1, hd): for (B, T, nh, 2, hd)
    got = model_mod.apply_rotary_2d(x, tuple(r[:, :, 0] for r in rope))

    def tables(p):
        c, s = table(p)
        return c.to(dtype)[:, :, None], s.to(dtype)[:, :, None]

    want = official_rotary(x, tables(pos[:, 0]), tables(pos[:, 1]))
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)
    # q and k of a head at once (the attention layer's call): each is rotated alike
    qk = torch.stack((x, -x), dim=3)  # (B, T, nh, 2, hd)
    got2 = model_mod.apply_rotary_2d(qk, rope)
    assert torch.equal(got2[:, :, :, 0], want) and torch.equal(got2[:, :, :, 1], -want)
