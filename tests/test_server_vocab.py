"""Token ids on the API are checked against the tokenizer, not the embedding.

The real ChatGLM-6B's embedding has 130528 rows while its tokenizer decodes ids below 130344;
this fixture reproduces that on the tiny model: its config says vocab_size 2344 + 16 and its
embedding has 16 padding rows more than the tokenizer has pieces.
"""

import json
import shutil

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import running_server  # noqa: E402

PAD = 16
PADDED_KEYS = ("transformer.word_embeddings.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def padded(tiny_dir, tmp_path_factory):
    """The tiny model with PAD embedding rows that no token decodes to."""
    import torch

    import localglm

    out = tmp_path_factory.mktemp("chatglm-6b-tiny-padded")
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, out / name)
    config = json.loads((tiny_dir / "config.json").read_text())
    config["vocab_size"] += PAD
    (out / "config.json").write_text(json.dumps(config))
    state = {}
    for shard in sorted(tiny_dir.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    for key in PADDED_KEYS:
        if key in state:
            w = state[key]
            state[key] = torch.cat([w, torch.zeros(PAD, w.shape[1], dtype=w.dtype)])
    torch.save(state, out / "pytorch_model.bin")
    model = localglm.load(out, precision="float32", device="cpu")
    assert model.config.vocab_size == model.tokenizer.vocab_size + PAD
    return model


def test_token_ids_beyond_the_tokenizer_are_a_400_not_a_500(padded):
    first_bad = padded.tokenizer.vocab_size
    with running_server(padded) as (base, _):
        for bad in (first_bad, padded.config.vocab_size - 1):
            r = httpx.post(f"{base}/v1/completions", timeout=30,
                           json={"prompt": [5, 6, bad], "max_tokens": 2})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "prompt" and f"[0, {first_bad})" in err["message"]
            r = httpx.post(f"{base}/v1/embeddings", json={"input": [5, bad]}, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "input"
        # The last id the tokenizer knows still works on both routes.
        ok = [5, 6, first_bad - 1]
        r = httpx.post(f"{base}/v1/completions", json={"prompt": ok, "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert httpx.post(f"{base}/v1/embeddings", json={"input": ok},
                          timeout=30).status_code == 200
