"""The one response streamer: stop strings, placeholders and changeable tails held back."""

import pytest

from localglm.chat import process_response, response_streamer
from localglm.streamer import TextStreamer


def pieces(streamer, texts, final=True):
    """What the streamer shows for successive texts (the last one final)."""
    return [streamer.push(t, final=final and i == len(texts) - 1) for i, t in enumerate(texts)]


def chat_pieces(raw_steps):
    """Pieces shown for a chat answer whose raw text grows by ``raw_steps``."""
    raw, texts = "", []
    for s in raw_steps:
        raw += s
        texts.append(process_response(raw))
    return pieces(response_streamer(), texts)


def test_placeholder_is_held_until_replaced():
    assert chat_pieces(["我训练于", "[[", "训练", "时间", "]]", "。"]) == [
        "我训练于", "", "", "", "2023年", "。"]


def test_something_that_only_starts_like_the_placeholder_is_shown():
    assert chat_pieces(["见", "[[", "1]]", "好"]) == ["见", "", "[[1]]", "好"]
    assert chat_pieces(["a", "[", "b"]) == ["a", "", "[b"]


def test_punctuation_and_spaces_wait_for_the_next_character():
    # "," becomes "，" once a CJK character follows; a trailing space is stripped for now.
    assert chat_pieces(["a", ",", "好"]) == ["a", "", "，好"]
    assert chat_pieces(["hello", " ", "world", "?"]) == ["hello", "", " world", "?"]
    assert chat_pieces(["好", " ", "[[训"]) == ["好", "", " [[训"]  # the end shows all
    s = response_streamer()
    assert pieces(s, ["好", "好 [[训"], final=False) == ["好", ""]
    assert s.push("好 [[训", final=True) == " [[训"


def test_stop_string_prefix_is_held_and_the_text_ends_at_the_stop():
    s = TextStreamer(stop=["</s>", "User:"])
    assert pieces(s, ["Hi", "Hi <", "Hi </", "Hi </s>more"], final=False) == ["Hi", " ", "", ""]
    assert s.stopped and s.shown == "Hi "
    assert s.push("Hi </s>more and more", final=True) == ""  # nothing after a stop


def test_only_a_possible_prefix_is_held():
    s = TextStreamer(stop=["User:"])
    assert pieces(s, ["Hello U", "Hello Us", "Hello Ux"], final=False) == ["Hello ", "", "Ux"]
    s = TextStreamer(stop=["abc"])
    assert pieces(s, ["xab", "xabd"]) == ["x", "abd"]
    assert not s.stopped


def test_final_push_flushes_everything():
    s = TextStreamer(stop=["</s>"], hold_chars=" ")
    assert pieces(s, ["a <", "a </"]) == ["a", " </"]


def test_stop_found_on_the_final_push():
    s = TextStreamer(stop=["!!"])
    assert pieces(s, ["ok", "ok!!x"]) == ["ok", ""]
    assert s.stopped and s.shown == "ok"


@pytest.mark.parametrize("final", [
    "你好,世界! 这是 a test, ok?",
    "训练于[[训练时间]],完成",
    "代码:\n```python\nprint(1)\n```\n",
    "  leading and trailing  \n",
    "数学:$x^2$;完",
    "[[训练时间]] [[训练时间]]",
])
def test_chat_pieces_add_up_to_the_final_response(final):
    s, out = response_streamer(), ""
    for i in range(1, len(final) + 1):
        piece = s.push(process_response(final[:i]))
        assert process_response(final).startswith(out + piece)
        out += piece
    out += s.push(process_response(final), final=True)
    assert out == process_response(final)


def test_stream_generate_cuts_at_stop_strings(tiny):
    ids = tiny.tokenizer.encode("你好")
    full = "".join(r.text for r in tiny.stream_generate(ids, max_new_tokens=12))
    assert len(full) > 5
    stop = full[3:5]
    steps = list(tiny.stream_generate(ids, max_new_tokens=12, stop=[stop, "\x00never"]))
    assert "".join(r.text for r in steps) == full[:full.index(stop)]
    assert steps[-1].finish_reason == "stop"
