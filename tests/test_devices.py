"""Memory planning and layer placement over made-up machines."""

import pytest

from localglm.config import ModelConfig
from localglm.devices import (
    Device,
    GiB,
    choose_precision,
    model_bytes,
    needed_bytes,
    plan_split,
)
from localglm.errors import LocalGLMError

FULL = ModelConfig()  # ChatGLM-6B's real shapes


def test_full_size_weight_sizes_match_known_figures():
    # fp16 ChatGLM-6B is 6.17 B params = 12.35 GB = 11.5 GiB; int4: ~3 GiB blocks + embedding
    assert 11.4 < model_bytes(FULL, "float16")["total"] / GiB < 11.6
    assert 5.5 < model_bytes(FULL, "int8")["total"] / GiB < 7.0
    assert 3.6 < model_bytes(FULL, "int4")["total"] / GiB < 4.6


@pytest.mark.parametrize("free_gib, want", [(24, "float16"), (11, "int8"), (6, "int4"),
                                            (3, "int4")])
def test_auto_precision_picks_most_precise_that_fits(free_gib, want):
    p, why = choose_precision(FULL, Device("cuda:0", free_gib * GiB), 2048)
    assert p == want
    assert "GiB" in why


def test_prequantized_checkpoint_is_not_upcast():
    assert choose_precision(FULL, Device("cpu", 64 * GiB), 2048, checkpoint_bits=4)[0] == "int4"
    assert choose_precision(FULL, Device("cpu", 64 * GiB), 2048, checkpoint_bits=8)[0] == "int8"


def test_split_two_equal_gpus():
    devs = [Device("cuda:0", 8 * GiB), Device("cuda:1", 8 * GiB)]
    plan = plan_split(devs, FULL, "float16", 2048)
    assert len(plan) == 28
    assert plan == sorted(plan)  # contiguous: each device holds one run of layers
    n0 = plan.count("cuda:0")
    # the first GPU also holds the 1 GiB embedding, so it takes fewer layers
    assert 11 <= n0 < 14 and plan.count("cuda:1") == 28 - n0


def test_split_unequal_gpus_in_proportion():
    devs = [Device("cuda:0", 6 * GiB), Device("cuda:1", 12 * GiB)]
    plan = plan_split(devs, FULL, "int8", 2048)
    assert plan.count("cuda:1") > 2 * plan.count("cuda:0") - 2
    bytes0 = model_bytes(FULL, "int8")["embedding"] + plan.count("cuda:0") * model_bytes(
        FULL, "int8")["layer"]
    assert bytes0 < 6 * GiB


def test_split_respects_capacity_when_shares_do_not_fit():
    devs = [Device("cuda:0", 14 * GiB), Device("cuda:1", 1 * GiB)]
    plan = plan_split(devs, FULL, "int4", 512)
    per_layer = model_bytes(FULL, "int4")["layer"]
    assert plan.count("cuda:1") * per_layer <= 0.9 * GiB


def test_split_that_cannot_fit_is_a_clear_error():
    devs = [Device("cuda:0", 4 * GiB), Device("cuda:1", 4 * GiB)]
    with pytest.raises(LocalGLMError, match="float16 needs .* GiB.*lower precision"):
        plan_split(devs, FULL, "float16", 2048)


def test_tiny_model_single_device():
    cfg = ModelConfig(hidden_size=64, num_layers=3, num_attention_heads=4, vocab_size=2344,
                      inner_hidden_size=256)
    assert plan_split([Device("cpu", GiB)], cfg, "float32", 256) == ["cpu"] * 3
    assert needed_bytes(cfg, "float32", 256) < 2 * 1024 * 1024
