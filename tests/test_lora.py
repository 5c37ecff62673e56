"""LoRA layers: identity at init, save/reload, merge, PEFT file compatibility, `localglm merge`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import localglm
from localglm.cli import main as cli_main
from localglm.errors import LocalGLMError, ModelFormatError
from localglm.finetune import lora

TARGETS = list(lora.DEFAULT_TARGETS)
IDS = [5, 477, 664, 98, 402, 409, 26, 2001, 2004, 995, 82]  # prompt, [gMASK] <sop>, 2 answer ids
MERGE_TOL = 1e-3  # float32: (W + s*B@A)@x rounds differently from W@x + s*B@(A@x); logits ~70



def fresh(tiny_dir):
    """Our own float32 copy (the session fixture `tiny` must stay untouched)."""
    return localglm.load(tiny_dir, precision="float32", device="cpu")


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_fresh_adapter_is_identity_and_trainable(tiny_dir, tiny):
    llm = fresh(tiny_dir)
    names = lora.apply_lora(llm.model, r=4, alpha=8)
    assert len(names) == 4 * llm.config.num_layers
    assert "transformer.layers.0.attention.dense" in names  # not the MLP's dense_h_to_4h
    torch.testing.assert_close(llm.logits(IDS), tiny.logits(IDS), rtol=0, atol=0)
    trainable = [n for n, p in llm.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(names)


def test_save_reload_gives_identical_logits(tiny_dir, tmp_path):
    llm = fresh(tiny_dir)
    lora.apply_lora(llm.model, r=4, alpha=8, dropout=0.1)
    randomize(llm.model)
    llm.model.eval()
    lora.save_adapter(llm.model, tmp_path, {"base_model_name_or_path": "chatglm-6b-tiny"})
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.1)
    assert cfg["target_modules"] == sorted(TARGETS) and cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False and cfg["base_model_name_or_path"] == "chatglm-6b-tiny"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight" in keys
    assert keys["base_model.model.transformer.layers.2.mlp.dense_4h_to_h.lora_B.weight"].shape \
        == (64, 4)
    assert not list(tmp_path.glob("*.tmp"))

    other = fresh(tiny_dir)
    lora.load_adapter(other.model, tmp_path)
    torch.testing.assert_close(other.logits(IDS), llm.logits(IDS), rtol=0, atol=0)


def test_merge_matches_unmerged(tiny_dir, tmp_path):
    llm = fresh(tiny_dir)
    lora.apply_lora(llm.model, r=8, alpha=16)
    randomize(llm.model)
    before = llm.logits(IDS)
    lora.save_adapter(llm.model, tmp_path)
    assert lora.merge_adapter(llm.model) == 12
    assert not lora.lora_modules(llm.model)
    assert isinstance(llm.model.transformer.layers[0].attention.query_key_value, nn.Linear)
    torch.testing.assert_close(llm.logits(IDS), before, rtol=0, atol=MERGE_TOL)
    merged_on_load = fresh(tiny_dir)
    lora.load_adapter(merged_on_load.model, tmp_path, merge=True)
    torch.testing.assert_close(merged_on_load.logits(IDS), before, rtol=0, atol=MERGE_TOL)


def test_merge_command_writes_a_loadable_model(tiny_dir, tmp_path, capsys):
    llm = fresh(tiny_dir)
    lora.apply_lora(llm.model, r=4, alpha=8)
    randomize(llm.model, seed=3)
    lora.save_adapter(llm.model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli_main(["merge", str(tiny_dir), str(tmp_path / "adapter"), "-o", str(out),
                     "--dtype", "float32"]) == 0
    assert {"model.safetensors", "config.json", "ice_text.model"} <= {p.name for p in out.iterdir()}
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))
    merged = localglm.load(out, precision="float32", device="cpu")
    torch.testing.assert_close(merged.logits(IDS), llm.logits(IDS), rtol=0, atol=MERGE_TOL)
    assert cli_main(["merge", str(tiny_dir), str(tmp_path / "adapter"), "-o", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


# -- PEFT compatibility -----------------------------------------------------------------------

class Toy(nn.Module):
    """The official module names of the tiny model's linears, holding its weights."""

    def __init__(self, model):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList()
        for block in model.transformer.layers:
            layer = nn.Module()
            layer.attention, layer.mlp = nn.Module(), nn.Module()
            for parent, names in ((layer.attention, ("query_key_value", "dense")),
                                  (layer.mlp, ("dense_h_to_4h", "dense_4h_to_h"))):
                for name in names:
                    src = getattr(getattr(block, "attention" if parent is layer.attention
                                          else "mlp"), name)
                    lin = nn.Linear(src.in_features, src.out_features)
                    lin.load_state_dict(src.state_dict())
                    setattr(parent, name, lin)
            self.transformer.layers.append(layer)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        """PEFT's CAUSAL_LM wrapper looks this up, as on a transformers model."""
        raise NotImplementedError


def linears(model):
    return {n: m for n, m in model.named_modules()
            if n.rpartition(".")[2] in TARGETS and "layers" in n}


PEFT_VARIANTS = [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"dense_4h_to_h": 2},
     "alpha_pattern": {"query_key_value": 3}},
]


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("variant", PEFT_VARIANTS, ids=["plain", "rslora-patterns"])
def test_adapter_made_by_peft_loads_and_matches(tiny_dir, tmp_path, safe, variant):
    peft = pytest.importorskip("peft")
    llm = fresh(tiny_dir)
    toy = peft.get_peft_model(Toy(llm.model), peft.LoraConfig(target_modules=TARGETS, **variant))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in toy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    toy.save_pretrained(str(tmp_path), safe_serialization=safe)
    assert (tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")).exists()
    lora.load_adapter(llm.model, tmp_path)

    # Every adapted linear computes what PEFT's does.
    x = torch.randn(2, 3, 256)
    peft_mods = linears(toy.base_model.model)
    ours = linears(llm.model)
    assert set(ours) == set(peft_mods)
    with torch.no_grad():
        for name, mod in ours.items():
            xi = x[..., :mod.in_features]
            torch.testing.assert_close(mod(xi), peft_mods[name](xi), rtol=1e-5, atol=1e-5)
    # And the whole model matches the tiny model with PEFT's merged weights.
    merged = toy.merge_and_unload()
    reference = fresh(tiny_dir)
    with torch.no_grad():
        for name, mod in linears(reference.model).items():
            mod.load_state_dict(linears(merged)[name].state_dict())
    torch.testing.assert_close(llm.logits(IDS), reference.logits(IDS), rtol=0, atol=MERGE_TOL)


def test_peft_loads_our_adapter(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    llm = fresh(tiny_dir)
    lora.apply_lora(llm.model, r=4, alpha=8)
    randomize(llm.model, seed=5)
    lora.save_adapter(llm.model, tmp_path)
    toy = peft.PeftModel.from_pretrained(Toy(fresh(tiny_dir).model), str(tmp_path))
    x = torch.randn(3, 256)
    peft_mods = linears(toy.base_model.model)
    with torch.no_grad():
        for name, mod in linears(llm.model).items():
            xi = x[..., :mod.in_features]
            torch.testing.assert_close(mod(xi), peft_mods[name](xi), rtol=1e-5, atol=1e-5)


def test_peft_key_variants(tiny_dir, tmp_path):
    """In-memory PEFT names (`.default`) and names without `base_model.model.` load too."""
    llm = fresh(tiny_dir)
    lora.apply_lora(llm.model, targets=("query_key_value",), r=2, alpha=4)
    randomize(llm.model, seed=7)
    lora.save_adapter(llm.model, tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    renamed = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
               for k, v in state.items()}
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(renamed, tmp_path / "adapter_model.bin")
    other = fresh(tiny_dir)
    lora.load_adapter(other.model, tmp_path)
    torch.testing.assert_close(other.logits(IDS), llm.logits(IDS), rtol=0, atol=0)


def test_bad_adapters_are_reported(tiny_dir, tmp_path):
    llm = fresh(tiny_dir)
    with pytest.raises(ModelFormatError, match="no adapter_config.json"):
        lora.load_adapter(llm.model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                              "lora_alpha": 4}))
    key = "base_model.model.transformer.layers.0.attention.dense.lora_"
    save_file({key + "A.weight": torch.zeros(2, 32), key + "B.weight": torch.zeros(64, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ModelFormatError, match=r"lora_A \(2, 32\).*needs \(2, 64\)"):
        lora.load_adapter(llm.model, tmp_path)
    save_file({"base_model.model.encoder.q.lora_A.weight": torch.zeros(2, 2),
               "base_model.model.encoder.q.lora_B.weight": torch.zeros(2, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ModelFormatError, match="no module.*encoder.q"):
        lora.load_adapter(llm.model, tmp_path)
    with pytest.raises(LocalGLMError, match="no block module is named qkv"):
        lora.apply_lora(llm.model, targets=("query_key_value", "qkv"))
    with pytest.raises(LocalGLMError, match="rank must be >= 1"):
        lora.apply_lora(llm.model, r=0)
