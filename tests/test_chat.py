"""Prompt format, response clean-up, history budget and conversation files."""

import json

import pytest

from localglm.chat import build_prompt, fit_prompt, normalize_history, process_response
from localglm.errors import ContextTooLongError


def test_prompt_format():
    assert build_prompt("你好") == "你好"
    h = [("a", "b"), ("c", "d")]
    assert build_prompt("e", h) == (
        "[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答：d\n[Round 2]\n问：e\n答：")


def test_process_response():
    assert process_response("  你好,世界!  ") == "你好，世界！"
    assert process_response("a, b! c: d; e?") == "a, b! c: d; e?"  # no CJK neighbour
    assert process_response("x?好") == "x？好"
    assert process_response("[[训练时间]]") == "2023年"


def test_normalize_history_rejects_bad_shapes():
    assert normalize_history([["q", "r"]]) == [("q", "r")]
    with pytest.raises(ValueError, match=r"history\[1\]"):
        normalize_history([["q", "r"], ["only one"]])


def test_fit_prompt_drops_oldest_rounds_first(tiny):
    tok = tiny.tokenizer
    history = [(f"问题{i}", "回答" * 10) for i in range(6)]
    full = len(tok.encode(build_prompt("现在", history)))
    fitted = fit_prompt(tok, "现在", history, budget=full + 10, reserve=10)
    assert fitted.dropped == 0 and fitted.history == history
    fitted = fit_prompt(tok, "现在", history, budget=full - 1 + 10, reserve=10)
    assert fitted.dropped >= 1
    assert fitted.history == history[fitted.dropped:]  # the newest rounds are kept
    assert len(fitted.ids) + 10 <= full - 1 + 10
    only_query = len(tok.encode("现在"))
    fitted = fit_prompt(tok, "现在", history, budget=only_query + 10, reserve=10)
    assert fitted.dropped == 6 and fitted.ids == tok.encode("现在")


def test_query_alone_too_long_is_an_error(tiny):
    with pytest.raises(ContextTooLongError, match="does not fit the context budget of 8"):
        fit_prompt(tiny.tokenizer, "这是一个很长的问题" * 3, [], budget=8, reserve=4)


def test_chat_reports_dropped_rounds(tiny):
    history = [(f"问题{i}", "回答" * 20) for i in range(10)]
    steps = list(tiny.chat_stream("你好", history, max_new_tokens=4, do_sample=False,
                                  max_length=120))
    assert steps[-1].dropped > 0
    assert steps[-1].history[:-1] == history  # the caller's history is returned whole
    with pytest.raises(ContextTooLongError):
        tiny.chat("很长" * 200, [], max_new_tokens=4)


def test_save_and_load_conversation(tmp_path):
    from localglm.commands.chat import load_history, save_history

    h = [("你好", "你好！"), ("1+1?", "2")]
    save_history(tmp_path / "c.json", h)
    assert json.loads((tmp_path / "c.json").read_text())["history"] == [list(r) for r in h]
    assert load_history(tmp_path / "c.json") == h
    (tmp_path / "bad.json").write_text("{not json")
    from localglm.errors import LocalGLMError

    with pytest.raises(LocalGLMError, match="not a saved conversation"):
        load_history(tmp_path / "bad.json")


def test_stable_part_holds_back_changeable_tail():
    from localglm.commands.chat import stable_part

    assert stable_part("你好,") == "你好"
    assert stable_part("你好 ") == "你好"
    assert stable_part("你好") == "你好"
