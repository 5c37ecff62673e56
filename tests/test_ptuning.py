"""P-Tuning v2: official-golden logits, training a prefix, the official checkpoint layout."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import localglm
from localglm.finetune.data import Dataset, Example, Limits, encode
from localglm.finetune.forward import mean_loss
from localglm.finetune.train import TrainConfig, train

OFFICIAL = Path(__file__).parent / "data" / "chatglm-6b-tiny-ptuning"
KEY = "transformer.prefix_encoder.embedding.weight"



def test_official_ptuning_checkpoint_matches_golden(tiny_dir, cases, golden_logits):
    llm = localglm.load(tiny_dir, precision="float32", device="cpu", ptuning=OFFICIAL)
    assert llm.config.pre_seq_len == 4
    for case in cases["variants"]["ptuning"]["cases"]:
        got = llm.logits(case["input_ids"])[-1]
        want = golden_logits[f"ptuning/{case['name']}.last_logits"]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3, msg=case["name"])
        assert int(got.argmax()) == case["last_top5"][0]


def test_ptuning_training_saves_the_official_format(tiny_dir, tmp_path):
    llm = localglm.load(tiny_dir, precision="float32", device="cpu")
    tok = llm.tokenizer
    pairs = [("你好", "我是一个模型"), ("hello", "hi there")]
    data = Dataset([encode(tok, Example(q, a), Limits()) for q, a in pairs], "mem", "ptuning")
    cfg = TrainConfig(method="ptuning", pre_seq_len=4, max_steps=30, batch_size=2, lr=5e-2,
                      progress=False)
    res = train(llm, data, tmp_path / "prefix", cfg)
    assert res.losses[-1] < 0.5 * res.losses[0], res.losses
    assert not any(p.requires_grad for n, p in llm.model.named_parameters()
                   if "prefix_encoder" not in n)

    out = tmp_path / "prefix"
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    official = torch.load(OFFICIAL / "pytorch_model.bin", weights_only=True)
    assert list(state) == list(official) == [KEY]
    assert state[KEY].dtype == official[KEY].dtype == torch.float32
    assert state[KEY].shape == official[KEY].shape == (4, 3 * 2 * 64)
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[KEY], state[KEY])
    saved_cfg = json.loads((out / "config.json").read_text())
    official_cfg = json.loads((OFFICIAL / "config.json").read_text())
    assert (saved_cfg["pre_seq_len"], saved_cfg["prefix_projection"]) == (4, False)
    for key in ("hidden_size", "num_layers", "vocab_size", "model_type", "auto_map"):
        assert saved_cfg[key] == official_cfg[key]

    # The saved prefix reloads through localglm.load(ptuning=...) to identical logits.
    reloaded = localglm.load(tiny_dir, precision="float32", device="cpu", ptuning=out)
    ids = data.examples[0].ids
    torch.testing.assert_close(reloaded.logits(ids), llm.logits(ids), rtol=0, atol=1e-5)
    assert mean_loss(reloaded.model, data.examples, reloaded.dtype) < res.losses[0]
