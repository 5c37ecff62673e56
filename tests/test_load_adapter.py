"""localglm.load(adapter=...) and --adapter apply a saved LoRA adapter."""

import torch

import localglm
import localglm.cli as cli
from localglm.finetune.lora import apply_lora, lora_parameters, save_adapter


def _random_adapter(tiny_dir, out):
    m = localglm.load(tiny_dir, precision="float32", device="cpu")
    apply_lora(m.model, r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(m.model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(m.model, out)
    return m


def test_load_with_adapter_matches_in_memory_adapter(tmp_path, tiny_dir, tiny):
    ref = _random_adapter(tiny_dir, tmp_path / "ad")
    loaded = localglm.load(tiny_dir, precision="float32", device="cpu", adapter=tmp_path / "ad")
    ids = tiny.tokenizer.encode("你好")
    assert torch.equal(loaded.logits(ids), ref.logits(ids))
    assert not torch.allclose(loaded.logits(ids), tiny.logits(ids))


def test_adapter_on_int4_base_and_cli_flag(tmp_path, tiny_dir, capsys):
    _random_adapter(tiny_dir, tmp_path / "ad")
    q = localglm.load(tiny_dir, precision="int4", device="cpu", adapter=tmp_path / "ad")
    assert q.chat("你好", max_new_tokens=4, do_sample=False)[0] is not None
    assert cli.main(["chat", str(tiny_dir), "--precision", "float32", "--adapter",
                     str(tmp_path / "ad"), "-p", "你好", "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
    ref = localglm.load(tiny_dir, precision="float32", device="cpu", adapter=tmp_path / "ad")
    assert capsys.readouterr().out.strip() == ref.chat("你好", max_new_tokens=6,
                                                       do_sample=False)[0]
