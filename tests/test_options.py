"""Generation options: one set of ranges for the Python API, the CLI and the server."""

import math

import pytest

from localglm.errors import LocalGLMError
from localglm.options import GenerationConfig, check_option


@pytest.mark.parametrize("field, value, message", [
    ("temperature", math.nan, "temperature must be a number >= 0 (0 = greedy), not nan"),
    ("temperature", -0.5, "temperature must be a number >= 0 (0 = greedy), not -0.5"),
    ("temperature", math.inf, "temperature must be a number >= 0 (0 = greedy), not inf"),
    ("top_p", 0.0, "top_p must be a number in (0, 1], not 0.0"),
    ("top_p", 1.5, "top_p must be a number in (0, 1], not 1.5"),
    ("top_p", math.nan, "top_p must be a number in (0, 1], not nan"),
    ("top_k", -5, "top_k must be a whole number >= 0 (0 = off), not -5"),
    ("top_k", 2.5, "top_k must be a whole number >= 0 (0 = off), not 2.5"),
    ("repetition_penalty", math.nan, "repetition_penalty must be a number > 0, not nan"),
    ("max_new_tokens", 0, "max_new_tokens must be a whole number >= 1, not 0"),
    ("max_length", -1, "max_length must be a whole number >= 1, not -1"),
    ("seed", 1 << 64, "seed must be a whole number in ["),
])
def test_out_of_range_options_are_refused(field, value, message):
    with pytest.raises(LocalGLMError) as e:
        GenerationConfig(**{field: value})
    assert str(e.value).startswith(message)


def test_valid_options_pass():
    g = GenerationConfig(temperature=0, top_p=1, top_k=0, max_new_tokens=None, seed=-1,
                         repetition_penalty=1.2, stop=["x"])
    assert g.greedy and g.top_p == 1
    assert check_option("temperature", 0.7) is None
    assert check_option("max_length", None) is None
    assert check_option("top_k", -1) == "must be a whole number >= 0 (0 = off)"
    with pytest.raises(LocalGLMError, match="stop must be a list of strings"):
        GenerationConfig(stop="x")
