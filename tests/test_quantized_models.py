"""Official int4/int8 checkpoints, quantize-on-load, and convert-then-load."""

import pytest
import torch
from conftest import DATA

import localglm
from localglm.convert import convert_model
from localglm.quantize import QuantizedLinear

ATOL = 2e-3
# bf16 activations (the fast CPU kernels) on the tiny model, whose logits reach ~70: the
# dense bf16 model itself moves logits by up to ~2.5 there, so the same bound is used.
BF16_ATOL = 3.0


@pytest.fixture(scope="module", params=["int4", "int8"])
def variant(request, cases):
    return request.param, cases["variants"][request.param]["cases"]


def test_official_checkpoint_exact_path(variant, golden_logits):
    name, vcases = variant
    m = localglm.load(DATA / f"chatglm-6b-tiny-{name}", compute_dtype="float32", device="cpu")
    assert m.precision == name
    assert isinstance(m.model.transformer.layers[0].mlp.dense_h_to_4h, QuantizedLinear)
    for c in vcases:
        got = m.logits(c["input_ids"])[-1]
        assert (got - golden_logits[f"{name}/{c['name']}.last_logits"]).abs().max() < ATOL
        assert m.generate(c["input_ids"], max_new_tokens=24) == c["greedy_new_ids"]


def test_official_checkpoint_fast_kernels(variant, golden_logits):
    name, vcases = variant
    m = localglm.load(DATA / f"chatglm-6b-tiny-{name}", device="cpu")
    assert m.dtype == torch.bfloat16  # the fast default on CPU
    for c in vcases:
        got = m.logits(c["input_ids"])[-1]
        want = golden_logits[f"{name}/{c['name']}.last_logits"]
        assert (got - want).abs().max() < BF16_ATOL, c["name"]
        assert got.argmax() == want.argmax(), c["name"]  # top-1 agreement


def test_quantize_on_load_reproduces_official_int4(cases):
    a = localglm.load(DATA / "chatglm-6b-tiny", precision="int4", group_size=0,
                      compute_dtype="float32", device="cpu")
    b = localglm.load(DATA / "chatglm-6b-tiny-int4", compute_dtype="float32", device="cpu")
    ids = cases["cases"][3]["input_ids"]
    assert torch.equal(a.logits(ids), b.logits(ids))


@pytest.mark.parametrize("precision, group", [("int4", 32), ("int4", 0), ("int8", 0)])
def test_convert_then_load_is_bit_identical_to_quantize_on_load(tmp_path, cases, precision,
                                                               group):
    out = tmp_path / "q"
    convert_model(DATA / "chatglm-6b-tiny", out, precision, group, progress=False)
    saved = localglm.load(out, compute_dtype="float32", device="cpu")
    live = localglm.load(DATA / "chatglm-6b-tiny", precision=precision, group_size=group,
                         compute_dtype="float32", device="cpu")
    ids = cases["cases"][4]["input_ids"]
    assert saved.precision == precision
    assert torch.equal(saved.logits(ids), live.logits(ids))
    fast_saved = localglm.load(out, device="cpu")
    fast_live = localglm.load(DATA / "chatglm-6b-tiny", precision=precision, group_size=group,
                              device="cpu")
    assert torch.equal(fast_saved.logits(ids), fast_live.logits(ids))


def test_convert_bin_to_safetensors_float(tmp_path, tiny, cases):
    out = tmp_path / "f32"
    convert_model(DATA / "chatglm-6b-tiny", out, "float32", progress=False)
    assert list(out.glob("*.bin")) == [] and (out / "model.safetensors").exists()
    ids = cases["cases"][0]["input_ids"]
    assert torch.equal(localglm.load(out, precision="float32", device="cpu").logits(ids),
                       tiny.logits(ids))


def test_convert_ptuning_checkpoint(tmp_path, cases):
    out = tmp_path / "pt"
    convert_model(DATA / "chatglm-6b-tiny-ptuning", out, "float32", progress=False)
    ids = cases["cases"][0]["input_ids"]
    a = localglm.load(DATA / "chatglm-6b-tiny", precision="float32", device="cpu",
                      ptuning=out)
    b = localglm.load(DATA / "chatglm-6b-tiny", precision="float32", device="cpu",
                      ptuning=DATA / "chatglm-6b-tiny-ptuning")
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_prequantized_checkpoint_cannot_be_upcast():
    with pytest.raises(localglm.LocalGLMError, match="holds int4 weights"):
        localglm.load(DATA / "chatglm-6b-tiny-int4", precision="float16", device="cpu")
    with pytest.raises(localglm.LocalGLMError, match="cannot become int8"):
        convert_model(DATA / "chatglm-6b-tiny-int4", DATA / "never", "int8", progress=False)
    assert not (DATA / "never").exists()


def test_quantize_command_writes_atomically(tmp_path):
    import localglm.cli as cli

    out = tmp_path / "q4"
    assert cli.main(["quantize", str(DATA / "chatglm-6b-tiny"), "-o", str(out),
                     "--precision", "int4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "ice_text.model", "model.safetensors", "tokenizer_config.json"]
    assert cli.main(["quantize", str(DATA / "chatglm-6b-tiny"), "-o", str(out),
                     "--precision", "int4"]) == 1  # refuses to overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["q4"]  # no temp dirs left behind
