"""`localglm bench --concurrency` on tiny shapes (full-size runs are by hand)."""

import json

import localglm.cli as cli
from localglm import bench_batch


def test_concurrency_levels_and_join_gap(tiny):
    res = bench_batch.run(tiny.model, tiny.dtype, [1, 3], prompt_tokens=8, new_tokens=4,
                          join_tokens=60, prefill_tokens=20, log=lambda *a: None)
    assert [x.streams for x in res.levels] == [1, 3]
    for x in res.levels:
        assert x.aggregate_tokens_per_s > 0 and x.stream_tokens_per_s > 0
        assert 0 < x.ttft_s_mean <= x.ttft_s_max and x.worst_gap_s > 0
    # 60 tokens, 20 per step over 3 layers: one layer per step, the stream decoding meanwhile
    assert res.join.prefill_steps == 3 and res.join.worst_gap_s > 0


def test_bench_concurrency_cli_json(capsys, tiny_dir):
    assert cli.main(["bench", "--model", str(tiny_dir), "--precision", "float32",
                     "--concurrency", "1,2", "--prompts", "8,40", "--decode-tokens", "3",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [x["streams"] for x in out["levels"]] == [1, 2]
    assert set(out["levels"][0]) == {"streams", "aggregate_tokens_per_s",
                                     "stream_tokens_per_s", "ttft_s_mean", "ttft_s_max",
                                     "worst_gap_s", "decode_step_s"}
    assert out["join"]["prompt_tokens"] == 40 and out["new_tokens"] == 3


def test_bench_concurrency_cli_table_and_bad_levels(capsys, tiny_dir):
    assert cli.main(["bench", "--model", str(tiny_dir), "--precision", "float32",
                     "--concurrency", "2", "--prompts", "8", "--decode-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "aggregate tok/s" in out and "joining" not in out
    assert cli.main(["bench", "--model", str(tiny_dir), "--concurrency", "0,2"]) != 0
    assert "error: --concurrency must be comma-separated counts" in capsys.readouterr().err
