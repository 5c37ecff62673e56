import math

import torch

from localglm.sampling import (
    make_sampler,
    repetition_penalty,
    replace_invalid,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, -1.0, 4.9]])
    assert make_sampler(0.0)(logits).tolist() == [1, 0]


def test_replace_invalid_matches_official_guard():
    logits = torch.tensor([[1.0, float("nan"), 0, 0, 0, 0, 0], [1.0, 2.0, 0, 0, 0, 0, 0]])
    out = replace_invalid(logits)
    assert out[0].tolist() == [0, 0, 0, 0, 0, 5e4, 0]
    assert out[1].tolist() == logits[1].tolist()  # rows without NaN/Inf untouched


def test_top_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG, 4.0, 3.0, NEG]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.5))
    assert kept.tolist() == [[True, False, False, False]]
    kept = torch.isfinite(top_p_filter(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_is_seeded_and_follows_distribution():
    logits = torch.tensor([[math.log(0.75), math.log(0.25)]]).repeat(4000, 1)
    a = make_sampler(1.0, generator=torch.Generator().manual_seed(0))(logits)
    b = make_sampler(1.0, generator=torch.Generator().manual_seed(0))(logits)
    assert torch.equal(a, b)
    frac = (a == 0).float().mean().item()
    assert 0.72 < frac < 0.78


def test_low_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).repeat(2000, 1)
    s = make_sampler(0.05, generator=torch.Generator().manual_seed(1))(logits)
    assert (s == 0).all()


def _nucleus_dense(logits, p, candidates):
    from localglm.sampling import nucleus_candidates

    found = nucleus_candidates(logits, p, candidates)
    if found is None:
        return None
    idx, w = found
    dense = torch.zeros_like(logits).scatter_(-1, idx, w)
    return dense / dense.sum(-1, keepdim=True)


def test_nucleus_candidates_give_exactly_the_top_p_distribution():
    g = torch.Generator().manual_seed(3)
    # a peaked row (nucleus of a few tokens) and a broad one (nucleus of ~1000) over 130k
    peaked = torch.randn(130528, generator=g) * 2
    peaked[torch.randperm(130528, generator=g)[:40]] += torch.linspace(8, 14, 40)
    broad = torch.randn(130528, generator=g) * 0.3
    logits = torch.stack([peaked, peaked * 0.8])
    want = top_p_filter(logits, 0.7).softmax(-1)
    got = _nucleus_dense(logits, 0.7, 256)
    assert got is not None
    assert torch.equal(got > 0, want > 0)  # the same set of tokens
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # the broad row's nucleus does not fit in 256 candidates: the exact fallback is taken
    assert _nucleus_dense(broad[None], 0.7, 256) is None
    assert (top_p_filter(broad[None], 0.7).isfinite().sum()) > 256


def test_hand_made_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    got = _nucleus_dense(probs.log(), 0.7, 3)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]]))
    assert _nucleus_dense(probs.log(), 0.99, 2) is None  # 0.8 < 0.99: candidates too few


def test_top_p_sampler_falls_back_and_follows_distribution():
    from localglm.sampling import sample_top_p

    # 400 equally likely tokens: the nucleus (280) exceeds the 256 candidates
    logits = torch.zeros(2000, 400)
    s = sample_top_p(logits, 0.7, torch.Generator().manual_seed(0))
    assert int(s.max()) < 400 and len(set(s.tolist())) > 200
    logits = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]]).repeat(4000, 1)
    s = sample_top_p(logits, 0.7, torch.Generator().manual_seed(0))
    assert set(s.tolist()) == {0, 1}
    assert 0.63 < (s == 0).float().mean().item() < 0.70  # 0.6 / 0.9
