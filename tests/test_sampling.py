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
