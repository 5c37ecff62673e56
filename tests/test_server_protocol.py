"""Request models of the server: OpenAI messages -> ChatGLM query and history, errors."""

import pytest

pytest.importorskip("pydantic")

from pydantic import ValidationError  # noqa: E402

from localglm.server.protocol import (
    APIError,
    ApiPyRequest,
    ChatCompletionRequest,
    CompletionRequest,  # noqa: E402
    validation_error_body,
)


def chat(*messages, **kw):
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": r, "content": c} for r, c in messages], **kw})


def test_user_assistant_turns_pair_into_history():
    q, h = chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"),
                ("user", "e")).to_chat()
    assert (q, h) == ("e", [("a", "b"), ("c", "d")])


def test_system_goes_in_front_of_the_first_user_query():
    assert chat(("system", "S"), ("user", "q")).to_chat() == ("S\nq", [])
    assert chat(("system", "S"), ("user", "a"), ("assistant", "b"),
                ("user", "q")).to_chat() == ("q", [("S\na", "b")])
    assert chat(("developer", "S"), ("user", "q")).to_chat() == ("S\nq", [])


def test_consecutive_messages_of_one_role_are_joined():
    assert chat(("user", "a"), ("user", "b")).to_chat() == ("a\nb", [])
    assert chat(("assistant", "hi"), ("user", "q")).to_chat() == ("q", [("", "hi")])


def test_text_parts_are_joined():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert req.to_chat() == ("ab", [])


@pytest.mark.parametrize("messages,param", [
    ([("user", "a"), ("assistant", "b")], "messages[1].role"),
    ([("system", "s")], "messages[0].role"),
    ([("user", " ")], "messages[0].content"),
])
def test_conversations_that_do_not_end_with_a_question(messages, param):
    with pytest.raises(APIError) as e:
        chat(*messages).to_chat()
    assert e.value.status == 400 and e.value.param == param


def test_strict_types_and_ranges():
    for bad in ({"temperature": "0.5"}, {"temperature": 2.5}, {"top_p": -1},
                {"max_tokens": 0}, {"n": 3}, {"stream": "yes"}, {"seed": 1.5}):
        with pytest.raises(ValidationError):
            chat(("user", "x"), **bad)
    assert chat(("user", "x"), temperature=1, unknown_field=3).temperature == 1.0
    assert chat(("user", "x"), stop="a").stop_list() == ["a"]
    assert chat(("user", "x"), max_completion_tokens=7).max_new_tokens() == 7
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]


def test_validation_error_body_names_the_field():
    with pytest.raises(ValidationError) as e:
        ApiPyRequest.model_validate_json('{"history": []}')
    body = validation_error_body(e.value)["error"]
    assert body == {"message": "'prompt' is required", "type": "invalid_request_error",
                    "param": "prompt", "code": "missing"}
    with pytest.raises(ValidationError) as e:
        chat(("wizard", "x"))
    body = validation_error_body(e.value)["error"]
    assert body["param"] == "messages[0].role" and "'user'" in body["message"]
