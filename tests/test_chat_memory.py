"""100 chat rounds on the tiny model: history is trimmed and memory stays flat."""

import importlib.util
import io
from pathlib import Path

import localglm


def _script():
    path = Path(__file__).parents[1] / "benchmarks" / "chat_memory.py"
    spec = importlib.util.spec_from_file_location("chat_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hundred_rounds_bounded(tiny_dir):
    model = localglm.load(tiny_dir, precision="float32", device="cpu", max_context=96)
    out = io.StringIO()
    rows = _script().run(model, rounds=100, max_new_tokens=8, out=out)
    assert len(rows) == 100
    assert rows[-1]["dropped"] > 50  # old rounds were dropped, never the current query
    assert all(r["prompt_tokens"] + 8 <= 96 for r in rows)
    assert len({r["kv_cache_mb"] for r in rows}) == 1  # one allocation, reused
    growth = rows[-1]["rss_mb"] - rows[-50]["rss_mb"]
    assert growth < 8, out.getvalue()
    assert "RSS growth over the last 50 rounds" in out.getvalue()
