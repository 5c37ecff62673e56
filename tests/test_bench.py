"""The benchmark machinery on tiny shapes (the full-size runs are by hand: localglm bench)."""

import json

import pytest

import localglm.cli as cli
from localglm import bench
from localglm.config import ModelConfig
from localglm.quantize import QuantizedLinear

TINY_CFG = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=2048,
                       inner_hidden_size=256, max_sequence_length=128, mask_token_id=2000,
                       gmask_token_id=2001, bos_token_id=2004, eos_token_id=2005)


def test_synthetic_int4_model_runs_and_counts_bytes():
    import torch

    m = bench.synthetic_model(TINY_CFG, "int4", torch.bfloat16, group_size=32)
    lin = m.transformer.layers[0].mlp.dense_h_to_4h
    assert isinstance(lin, QuantizedLinear) and lin.bits == 4 and lin.group_size == 32
    # int4 blocks are ~4.5 bits/weight, so a full float16 model would be > 3x bigger
    dense = bench.synthetic_model(TINY_CFG, "bfloat16", torch.bfloat16)
    assert isinstance(dense.transformer.layers[0].mlp.dense_h_to_4h, torch.nn.Linear)
    assert bench.decode_bytes_per_token(m) < bench.decode_bytes_per_token(dense)
    tps, ms = bench.prefill_and_decode(m, 20, 3, torch.bfloat16)
    assert tps > 0 and ms > 0


def test_bench_json_has_the_documented_keys(capsys, monkeypatch):
    monkeypatch.setattr(bench, "CHATGLM_6B", TINY_CFG)
    assert cli.main(["bench", "--synthetic", "chatglm-6b", "--precision", "int8",
                     "--prompts", "8,24", "--decode-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("decode_ms_per_token", "decode_ms_per_token_long", "prefill_tokens_per_s",
                "peak_rss_mb", "bandwidth_gbs", "roofline_ms_per_token", "load_s"):
        assert key in out
    assert set(out["prefill_tokens_per_s"]) == {"8", "24"}
    assert out["long_context"] == 24
    # one peak, in MiB and in GB (1e9 bytes: the unit chatglm.cpp's figures are quoted in)
    assert out["peak_rss_gb"] == pytest.approx(out["peak_rss_mb"] * 2**20 / 1e9)


def test_bench_real_model_dir_table(capsys, tiny_dir):
    assert cli.main(["bench", "--model", str(tiny_dir), "--precision", "float32",
                     "--prompts", "8,16", "--decode-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "decode vs roofline" in out and "prefill 16 tokens" in out
