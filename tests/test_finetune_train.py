"""Training: the loss falls, the model learns the answers, checkpoints resume exactly."""

import json

import pytest
import torch

import localglm
from localglm.cli import main as cli_main
from localglm.finetune import lora
from localglm.finetune.data import Example, Limits, encode, load_dataset
from localglm.finetune.forward import collate, loss_sum, mean_loss
from localglm.finetune.train import TrainConfig, lr_factor, total_steps, train

ROWS = [{"content": "你好", "summary": "我是一个模型"},
        {"content": "介绍一下清华大学", "summary": "清华大学在北京"},
        {"content": "hello", "summary": "hi there"},
        {"content": "1+1=?", "summary": "2"}]
FAST = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "batch_size": 4, "lr": 1e-2,
        "progress": False}



@pytest.fixture
def data_file(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS), encoding="utf-8")
    return f


def fresh(tiny_dir, precision="float32"):
    return localglm.load(tiny_dir, precision=precision, device="cpu")


def test_lora_training_learns_the_answers(tiny_dir, data_file, tmp_path):
    llm = fresh(tiny_dir)
    data = load_dataset(data_file, llm.tokenizer)
    before = mean_loss(llm.model, data.examples, llm.dtype)
    res = train(llm, data, tmp_path / "out", TrainConfig(max_steps=40, **FAST))
    after = mean_loss(llm.model, data.examples, llm.dtype)
    assert res.steps == 40 and len(res.losses) == 40
    assert after < 0.05 * before, (before, after)
    for row in ROWS:
        response, _ = llm.chat(row["content"], do_sample=False, max_new_tokens=16)
        assert response == row["summary"]
    # The saved adapter reproduces the trained model exactly.
    other = fresh(tiny_dir)
    lora.load_adapter(other.model, tmp_path / "out")
    ids = data.examples[0].ids
    torch.testing.assert_close(other.logits(ids), llm.logits(ids), rtol=0, atol=0)


def test_checkpoint_and_resume_continue_the_same_run(tiny_dir, data_file, tmp_path):
    cfg = dict(FAST, batch_size=2, grad_accum=2, lora_dropout=0.1, warmup_steps=2,
               max_steps=6, save_steps=3)
    whole = fresh(tiny_dir)
    data = load_dataset(data_file, whole.tokenizer)
    full = train(whole, data, tmp_path / "a", TrainConfig(**cfg))
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt",
            "trainer_state.json"} <= names
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3

    resumed_llm = fresh(tiny_dir)
    resumed = train(resumed_llm, data, tmp_path / "b", TrainConfig(**cfg), resume=ckpt)
    assert resumed.steps == 6
    torch.testing.assert_close(resumed.losses, full.losses, rtol=1e-5, atol=1e-6)
    a = lora.lora_state_dict(whole.model)
    b = lora.lora_state_dict(resumed_llm.model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_eval_loss_is_reported(tiny_dir, data_file, tmp_path):
    llm = fresh(tiny_dir)
    data = load_dataset(data_file, llm.tokenizer)
    before = mean_loss(llm.model, data.examples, llm.dtype)
    res = train(llm, data, tmp_path / "out", TrainConfig(max_steps=4, eval_steps=2, **FAST),
                eval_data=data)
    assert [s for s, _ in res.eval_losses] == [2, 4]
    assert res.eval_losses[-1][1] < before


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, tiny):
    llm = fresh(tiny_dir)
    lora.apply_lora(llm.model, r=4, alpha=8)
    params = lora.lora_parameters(llm.model)
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        for m in lora.lora_modules(llm.model).values():
            m.lora_B.weight.normal_(0, 0.02)
    tok = tiny.tokenizer
    examples = [encode(tok, Example(q, a), Limits()) for q, a in [("你好", "你好呀"), ("hi", "ok")]]
    tb = collate(examples, llm.config, "cpu")  # two rows: exercises left padding too
    grads = []
    for ckpt in (False, True):
        loss_sum(llm.model, tb, torch.float32, checkpointing=ckpt).backward()
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g0)
    assert any(g.abs().sum() > 0 for g in grads[0])
    # The training loss is the plain next-token loss of the answer under the inference forward.
    ids = examples[0].ids
    logits = llm.logits(ids)[examples[0].context:-1]
    targets = torch.tensor(ids[examples[0].context + 1:])
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    one = collate(examples[:1], llm.config, "cpu")
    torch.testing.assert_close(loss_sum(llm.model, one, torch.float32), expected)


def test_schedule_and_step_count():
    assert [round(lr_factor(s, 2, 10, "cosine"), 3) for s in (0, 1, 2, 6, 10)] == \
        [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(6, 2, 10, "linear") == 0.5 and lr_factor(9, 0, 10, "constant") == 1.0
    assert total_steps(10, TrainConfig(epochs=3, batch_size=2, grad_accum=2)) == 8
    assert total_steps(10, TrainConfig(max_steps=5)) == 5


def test_finetune_on_int4_base_reduces_loss(tiny_dir, data_file, tmp_path):
    llm = localglm.load(tiny_dir, precision="int4", group_size=32, compute_dtype="float32",
                        device="cpu")
    assert type(llm.model.transformer.layers[0].mlp.dense_h_to_4h).__name__ == "QuantizedLinear"
    data = load_dataset(data_file, llm.tokenizer)
    before = mean_loss(llm.model, data.examples, llm.dtype)
    train(llm, data, tmp_path / "out", TrainConfig(max_steps=30, **FAST))
    assert mean_loss(llm.model, data.examples, llm.dtype) < 0.2 * before


def test_finetune_command(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    argv = ["finetune", str(tiny_dir), "--data", str(data_file), "--eval-data", str(data_file),
            "-o", str(out), "--precision", "float32", "--device", "cpu", "--max-steps", "4",
            "--batch-size", "2", "--lr", "1e-2", "--lora-r", "4", "--target-modules",
            "query_key_value,dense_4h_to_h", "--save-steps", "2"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "4 examples (ptuning format" in captured.err and "eval loss at step 4" in captured.err
    assert "--adapter" in captured.out
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["dense_4h_to_h", "query_key_value"]
    assert (out / "checkpoint-2" / "trainer_state.pt").exists()
    assert cli_main(argv) == 1  # refuses to overwrite a finished run
    assert "not empty" in capsys.readouterr().err
    assert cli_main(argv[:-2] + ["--max-steps", "6", "--resume", str(out / "checkpoint-2")]) == 0


def test_quantized_cpu_training_defaults_to_float32_activations():
    from localglm.cli import build_parser
    from localglm.commands.finetune import training_compute_dtype

    def pick(*flags):
        args = build_parser().parse_args(["finetune", "M", "--data", "d", "-o", "o", *flags])
        return training_compute_dtype(args)

    assert pick("--precision", "int4", "--device", "cpu") == "float32"
    assert pick("--precision", "int4", "--device", "cpu", "--compute-dtype", "bfloat16") \
        == "bfloat16"
    assert pick("--precision", "bfloat16", "--device", "cpu") is None
