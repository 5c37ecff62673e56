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


def test_commands_are_whole_lines():
    from localglm.commands.chat import parse_command

    assert parse_command("  stop ") == ("/exit", "")
    assert parse_command("clear") == ("/clear", "")
    assert parse_command("/save a b.json") == ("/save", "a b.json")
    assert parse_command("/regen") == ("/regen", "")
    for question in ("stop smoking: any tips?", "clear skies: what do they mean?",
                     "/usr/bin 是什么?", "Stop it", "clearly"):
        assert parse_command(question) is None, question
    assert parse_command("/sav x.json") == ("?", "/sav")  # a typo is not sent to the model
    assert parse_command("/foo") == ("?", "/foo")


def test_save_errors_name_the_users_path(tmp_path):
    from localglm.commands.chat import save_history
    from localglm.errors import LocalGLMError

    missing = tmp_path / "no" / "dir" / "x.json"
    with pytest.raises(LocalGLMError) as e:
        save_history(missing, [("q", "r")])
    assert str(e.value) == (f"cannot save to {missing}: the folder {missing.parent} does not "
                            "exist; create it or choose another file")
    with pytest.raises(LocalGLMError, match="it is a folder; give a file name"):
        save_history(tmp_path, [("q", "r")])
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_context_error_names_the_flags_the_user_set():
    from argparse import Namespace

    from localglm.commands.chat import context_error

    def flags(**kw):
        return Namespace(**{"max_new_tokens": None, "max_length": None, "max_context": None,
                            **kw})

    e = ContextTooLongError("x", prompt_tokens=300, reserved=1, budget=256)
    assert context_error(e, flags(), 256) == (
        "your message is 300 tokens; with 1 token left for the answer it does not fit the "
        "model's 256-token context: shorten it")
    e = ContextTooLongError("x", prompt_tokens=90, reserved=20, budget=100)
    assert context_error(e, flags(max_new_tokens=20, max_length=100), 2048) == (
        "your message is 90 tokens; with the 20 tokens --max-new-tokens keeps for the answer it "
        "does not fit --max-length 100: shorten it or lower --max-new-tokens or raise "
        "--max-length (the model's context holds 2048 tokens)")
    e = ContextTooLongError("x", prompt_tokens=1, reserved=64, budget=64)
    assert context_error(e, flags(max_new_tokens=64, max_context=64), 256).endswith(
        "does not fit --max-context 64: shorten it or lower --max-new-tokens or raise "
        "--max-context (the model's context holds 256 tokens)")


def test_context_error_counts_tokens_in_words(tiny):
    with pytest.raises(ContextTooLongError) as e:
        fit_prompt(tiny.tokenizer, "很长" * 40, [], budget=8, reserve=1)
    assert "with 1 token kept for the answer" in str(e.value)
    assert (e.value.reserved, e.value.budget) == (1, 8) and e.value.prompt_tokens > 8
