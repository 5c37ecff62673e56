"""Loading checkpoints: formats, and clear messages for typical broken downloads."""

import json
import shutil

import pytest
import torch

import localglm
from localglm.errors import ModelFormatError
from localglm.weights import save_model_dir


@pytest.fixture()
def model_copy(tmp_path, tiny_dir):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst, ignore=shutil.ignore_patterns("golden"))
    return dst


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
    with pytest.raises(ModelFormatError, match="not empty"):
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


def test_wrong_shapes(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["inner_hidden_size"] = 128
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"wrong shapes: .*dense_h_to_4h.weight: file "
                       r"\(256, 64\), model \(128, 64\)"):
        _load(model_copy)


def test_missing_and_unexpected_tensors(model_copy):
    f = model_copy / "pytorch_model-00002-of-00002.bin"
    state = torch.load(f, weights_only=True)
    del state["transformer.final_layernorm.weight"]
    state["transformer.extra.weight"] = torch.zeros(2)
    torch.save(state, f)
    with pytest.raises(ModelFormatError) as e:
        _load(model_copy)
    msg = str(e.value)
    assert "missing tensors: transformer.final_layernorm.weight" in msg
    assert "unexpected tensors: transformer.extra.weight" in msg


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
