"""JSON mode: the JSON prefix checker and the logits processor built on it."""

import json
import types

import pytest
import torch

from localglm.json_mode import JSONObjectProcessor, JSONPrefix, advance


@pytest.mark.parametrize("text", [
    "", " ", "{", '{"', '{"a', '{"a\\', '{"a\\u00', '{"a":', '{"a": -', '{"a": 1.', '{"a": 1e',
    '{"a": 1e+5', '{"a": [', '{"a": [tr', '{"a": [true, nu', '{"a": {"b": "c"}, "d": [1, ',
])
def test_prefixes_of_an_object_are_accepted(text):
    p = JSONPrefix()
    assert p.feed(text) and not p.complete


@pytest.mark.parametrize("text", [
    "{}", ' { "a" : [1, -0.5e-3, "x\\"y", {"b": null}, false] }', '{"\\u00e9": "é"}',
])
def test_whole_objects_are_complete(text):
    p = JSONPrefix()
    assert p.feed(text) and p.complete
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("text", [
    "[", '"a"', "1", "x", "{a", '{"a" 1', '{"a": 01', '{"a": 1.}', '{"a": -}', '{"a": tru}',
    '{"a": [1,]', '{"a": 1,}', '{"a\n": 1', '{"\\x": 1', "{}}", "{} x", "{}{",
])
def test_what_cannot_become_an_object_is_refused(text):
    assert advance(JSONPrefix.START, text) is None


TEXTS = [None, "{", "}", '"', "a", ":", " 1", ",", "[", "]", "true", " ", '"b":', "x", "}}",
         "é", "\n"]


def fake_tokenizer():
    # The processor reads only the token texts (cached on the tokenizer) and <eop>.
    return types.SimpleNamespace(_localglm_token_texts=TEXTS, eos_id=0)


@pytest.mark.parametrize("seed", range(20))
def test_the_processor_keeps_random_scores_on_a_json_object(seed):
    gen = torch.Generator().manual_seed(seed)
    prompt = [7, 7]
    ids = list(prompt)
    process = JSONObjectProcessor(fake_tokenizer(), len(prompt))
    for _ in range(40):
        scores = torch.randn(1, len(TEXTS), generator=gen)
        scores[0, 13] = 10.0  # "x" is always the model's favourite, and never valid
        masked = process(scores, torch.tensor([ids]))
        token = int(masked.argmax())
        assert torch.isfinite(masked[0, token])
        ids.append(token)
        if token == 0:
            break
    text = "".join(TEXTS[t] for t in ids[len(prompt):] if t)
    assert advance(JSONPrefix.START, text) is not None, text
    if ids[-1] == 0:  # <eop> comes only once the object is complete
        assert isinstance(json.loads(text), dict), text


def test_the_processor_forces_eop_once_the_object_is_complete():
    process = JSONObjectProcessor(fake_tokenizer(), 0)
    scores = torch.zeros(1, len(TEXTS))
    scores[0, 2] = 5.0  # "}"
    out = process(scores, torch.tensor([[1, 2]]))  # "{}" already written
    assert int(out.argmax()) == 0 and torch.isinf(out[0, 1:]).all()
