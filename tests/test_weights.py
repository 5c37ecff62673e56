"""Loading checkpoints: formats, and clear messages for typical broken downloads."""

import json

import pytest
import torch
from broken_models import SHARD1, SHARD2, copy_model, edit_config, make_lfs_pointer, truncate

import localglm
from localglm import weights
from localglm.errors import LocalGLMError, ModelFormatError
from localglm.weights import check_model_dir, save_model_dir


@pytest.fixture()
def model_copy(tmp_path, tiny_dir):
    return copy_model(tiny_dir, tmp_path / "model")


def _load(path):
    return localglm.load(path, precision="float32", device="cpu")


def test_safetensors_copy_loads_and_matches(tmp_path, tiny, tiny_dir):
    from localglm.weights import iter_checkpoint

    state = dict(iter_checkpoint(tiny_dir))
    cfg = json.loads((tiny_dir / "config.json").read_text())
    out = tmp_path / "st"
    save_model_dir(out, state, cfg, copy_from=tiny_dir, max_shard_bytes=400_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").exists()
    m = _load(out)
    ids = m.tokenizer.encode("你好")
    assert torch.equal(m.logits(ids), tiny.logits(ids))
    assert m.chat("你好", max_length=20, do_sample=False) == tiny.chat(
        "你好", max_length=20, do_sample=False)


def test_save_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(LocalGLMError, match="not empty"):
        save_model_dir(tmp_path / "x", {"a": torch.zeros(1)}, {})
    assert (tmp_path / "x" / "f").read_text() == "keep me"


def test_lfs_pointer(model_copy):
    (model_copy / "pytorch_model-00002-of-00002.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ModelFormatError) as e:
        _load(model_copy)
    msg = str(e.value)
    assert "pytorch_model-00002-of-00002.bin" in msg and "git lfs pull" in msg


def test_missing_shard(model_copy):
    (model_copy / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(ModelFormatError, match="pytorch_model-00001-of-00002.bin.*missing"):
        _load(model_copy)


def test_truncated_shard(model_copy):
    f = model_copy / "pytorch_model-00002-of-00002.bin"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ModelFormatError, match="truncated or corrupted"):
        _load(model_copy)


def test_truncated_safetensors(tmp_path, tiny_dir):
    from localglm.weights import iter_checkpoint

    out = tmp_path / "st"
    save_model_dir(out, dict(iter_checkpoint(tiny_dir)),
                   json.loads((tiny_dir / "config.json").read_text()), copy_from=tiny_dir)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelFormatError, match="model.safetensors.*truncated or corrupted"):
        _load(out)


def error_lines(model) -> list[str]:
    with pytest.raises(ModelFormatError) as e:
        _load(model)
    return str(e.value).splitlines()


FIX = "or use the config.json that came with these weights"


def test_wrong_shapes(model_copy):
    edit_config(model_copy, inner_hidden_size=128)
    assert error_lines(model_copy) == [
        f"{model_copy} has 2 problems:",
        "  config.json inner_hidden_size=128 but the weights have 256 (transformer.layers.0.mlp."
        f"dense_h_to_4h.weight is [256, 64]): set inner_hidden_size to 256, {FIX}",
        "  wrong shape (weights vs config.json) in all 3 layers: mlp.dense_4h_to_h.weight "
        "[64, 256] vs [64, 128], mlp.dense_h_to_4h.bias [256] vs [128], mlp.dense_h_to_4h.weight "
        "[256, 64] vs [128, 64]"]


def test_hidden_size_mismatch_names_the_field_and_lists_each_tensor_once(model_copy):
    edit_config(model_copy, hidden_size=32)
    assert error_lines(model_copy) == [
        f"{model_copy} has 3 problems:",
        "  config.json hidden_size=32 but the weights have 64 (transformer.word_embeddings.weight "
        f"is [2344, 64]): set hidden_size to 64, {FIX}",
        "  wrong shape (weights vs config.json) in all 3 layers: attention.dense.bias [64] vs "
        "[32], attention.dense.weight [64, 64] vs [32, 32], attention.query_key_value.bias "
        "[192] vs [96], attention.query_key_value.weight [192, 64] vs [96, 32] (and 7 more)",
        "  wrong shape (weights vs config.json): transformer.final_layernorm.bias [64] vs [32], "
        "transformer.final_layernorm.weight [64] vs [32], transformer.word_embeddings.weight "
        "[2344, 64] vs [2344, 32]"]


def test_num_layers_mismatch(model_copy):
    edit_config(model_copy, num_layers=4)
    assert error_lines(model_copy) == [
        f"{model_copy} has 2 problems:",
        "  config.json num_layers=4 but the weights have 3 (transformer.layers.0-2): set "
        f"num_layers to 3, {FIX}",
        "  missing in layer 3: attention.dense.bias, attention.dense.weight, "
        "attention.query_key_value.bias, attention.query_key_value.weight (and 8 more)"]
    edit_config(model_copy, num_layers=1)
    assert error_lines(model_copy)[1:] == [
        "  config.json num_layers=1 but the weights have 3 (transformer.layers.0-2): set "
        f"num_layers to 3, {FIX}",
        "  unexpected in 2 layers (1-2): attention.dense.bias, attention.dense.weight, "
        "attention.query_key_value.bias, attention.query_key_value.weight (and 8 more)"]


@pytest.mark.parametrize("fields, line", [
    ({"num_attention_heads": 8},
     "config.json num_attention_heads=8 but the weights have 4 (transformer.layers.0.attention."
     f"rotary_emb.inv_freq is [4], so head_dim is 16): set num_attention_heads to 4, {FIX}"),
    ({"vocab_size": 130528},
     "config.json vocab_size=130528 but the weights have 2344 (transformer.word_embeddings."
     f"weight is [2344, 64]): set vocab_size to 2344, {FIX}"),
    ({"quantization_bit": 8},
     "config.json quantization_bit=8 but the weights are not quantized (no *.weight_scale "
     f"tensors): remove quantization_bit, {FIX}"),
])
def test_config_field_is_named(model_copy, fields, line):
    edit_config(model_copy, **fields)
    assert check_model_dir(model_copy).problems[0] == line
    assert any(shown.endswith(line) for shown in error_lines(model_copy))  # the loader too


def test_quantized_weights_with_a_float_config(tmp_path, tiny_dir):
    model = copy_model(tiny_dir.parent / "chatglm-6b-tiny-int4", tmp_path / "m")
    edit_config(model, quantization_bit=8)
    assert error_lines(model)[1] == (
        "  config.json quantization_bit=8 but the weights have 4 (transformer.layers.0.attention."
        "query_key_value.weight is [192, 32] for hidden_size 64): set quantization_bit to 4, "
        f"{FIX}")
    edit_config(model, quantization_bit=0)
    assert error_lines(model)[1] == (
        "  config.json has no quantization_bit but the weights are int4 (transformer.layers.0."
        "attention.query_key_value.weight_scale exists): use the config.json that came with "
        "these weights")


def test_missing_and_unexpected_tensors(model_copy):
    f = model_copy / SHARD2
    state = torch.load(f, weights_only=True)
    del state["transformer.final_layernorm.weight"]
    state["transformer.extra.weight"] = torch.zeros(2)
    torch.save(state, f)
    assert error_lines(model_copy) == [
        f"{model_copy} has 2 problems:",
        "  missing: transformer.final_layernorm.weight",
        "  unexpected: transformer.extra.weight"]


def test_load_into_lists_each_tensor_once(tiny_dir):
    """What reaches the model without a checked directory (e.g. a P-Tuning prefix)."""
    from localglm.config import ModelConfig
    from localglm.model import ChatGLMModel

    cfg = ModelConfig.from_file(tiny_dir / "config.json")
    cfg.num_layers, cfg.inner_hidden_size = 2, 128
    with torch.device("meta"):
        model = ChatGLMModel(cfg)
    with pytest.raises(ModelFormatError) as e:
        weights.load_into(model, weights.iter_checkpoint(tiny_dir), lambda n, t: t, "src")
    assert str(e.value).splitlines() == [
        "src does not match its config.json:",
        "  unexpected in layer 2: attention.dense.bias, attention.dense.weight, "
        "attention.query_key_value.bias, attention.query_key_value.weight (and 8 more)",
        "  wrong shape (weights vs config.json) in all 2 layers: mlp.dense_4h_to_h.weight "
        "[64, 256] vs [64, 128], mlp.dense_h_to_4h.bias [256] vs [128], "
        "mlp.dense_h_to_4h.weight [256, 64] vs [128, 64]",
        "  Check that config.json belongs to these weights, or download them again."]


def test_quantizing_while_loading_passes_the_checks(tiny_dir):
    m = localglm.load(tiny_dir, precision="int4", device="cpu")
    assert m.precision == "int4"


def test_every_problem_is_listed_with_its_file(model_copy):
    """A clone without git-lfs, a lost tokenizer file and a truncated shard, all at once."""
    for name in (SHARD1, "ice_text.model"):
        make_lfs_pointer(model_copy / name)
    truncate(model_copy / SHARD2)
    (model_copy / "tokenizer_config.json").unlink()
    pull = "run `git lfs install && git lfs pull` in the model directory"
    lines = error_lines(model_copy)
    assert lines[0] == f"{model_copy} has 4 problems:"
    assert lines[1] == f"  {SHARD1} is a Git LFS pointer (a small text file), not the real file: " \
        + pull
    assert lines[2].startswith(f"  {model_copy / SHARD2} cannot be read (")
    assert lines[2].endswith("); the file is probably truncated or corrupted: download it again")
    assert lines[3:] == [
        "  ice_text.model is a Git LFS pointer (a small text file), not the real file: " + pull,
        "  tokenizer_config.json is missing: download the complete model directory (e.g. from "
        "THUDM/chatglm-6b), tokenizer files included"]
    assert check_model_dir(model_copy).problems == [line[2:] for line in lines[1:]]


def test_all_missing_shards_are_listed(model_copy):
    (model_copy / SHARD1).unlink()
    (model_copy / SHARD2).unlink()
    assert error_lines(model_copy) == [
        f"{model_copy} has 2 problems:",
        f"  {SHARD1} is listed in pytorch_model.bin.index.json but missing: the download is "
        "incomplete, fetch it again",
        f"  {SHARD2} is listed in pytorch_model.bin.index.json but missing: the download is "
        "incomplete, fetch it again"]


def test_check_reads_headers_only(tiny_dir, monkeypatch):
    loads = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append((kwargs.get("mmap"), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(weights, "read_file", no_reading)
    report = check_model_dir(tiny_dir)
    assert report.problems == [] and len(report.tensors) == 43
    assert loads == [(True, True), (True, True)]  # two shards, memory-mapped


def test_check_reads_safetensors_headers(tmp_path, tiny_dir):
    out = tmp_path / "st"
    save_model_dir(out, dict(weights.iter_checkpoint(tiny_dir)),
                   json.loads((tiny_dir / "config.json").read_text()), copy_from=tiny_dir)
    report = check_model_dir(out)
    assert report.problems == []
    emb = report.tensors["transformer.word_embeddings.weight"]
    assert (emb.shape, emb.dtype, emb.nbytes) == ((2344, 64), torch.float16, 2344 * 64 * 2)


def test_no_weights(model_copy):
    for f in model_copy.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(ModelFormatError, match="has no weights"):
        _load(model_copy)


def test_bad_config(model_copy):
    (model_copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelFormatError, match="model_type is 'llama'"):
        _load(model_copy)
    (model_copy / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    with pytest.raises(ModelFormatError, match="missing field.*hidden_size"):
        _load(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json"):
        _load(model_copy)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        _load(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="Hugging Face cache"):
        _load("THUDM/not-downloaded-model-xyz")


def test_pickle_with_code_is_refused(model_copy):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = model_copy / "pytorch_model-00002-of-00002.bin"
    with open(f, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ModelFormatError):
        _load(model_copy)


def test_non_tensor_in_a_checkpoint(model_copy):
    f = model_copy / SHARD2
    state = torch.load(f, weights_only=True)
    state["step"] = 3
    torch.save(state, f)
    assert check_model_dir(model_copy).problems == [
        f"{f}: step is not a tensor; is this a model checkpoint?"]


def test_safetensors_are_mapped_not_copied(tmp_path):
    from safetensors.torch import load_file, save_file

    from localglm.errors import ModelFormatError
    from localglm.weights import map_safetensors

    src = {"a": torch.arange(12, dtype=torch.int8).view(3, 4),
           "b": torch.randn(5).bfloat16(), "empty": torch.zeros(0, 3)}
    path = tmp_path / "m.safetensors"
    save_file(src, str(path))
    mapped = dict(map_safetensors(path))
    want = load_file(str(path))
    assert mapped.keys() == want.keys()
    for k in want:
        assert mapped[k].dtype == want[k].dtype and torch.equal(mapped[k], want[k])
    # a view of the mapping, private: writing to it leaves the file as it was
    assert not mapped["a"].untyped_storage().resizable()
    mapped["a"][0, 0] = 100
    assert torch.equal(load_file(str(path))["a"], src["a"])
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ModelFormatError, match="outside the file"):
        dict(map_safetensors(path))
