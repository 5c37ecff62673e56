import math

import pytest

import localglm
import localglm.cli as cli
from localglm.evaluate import evaluate, windows

TEXT = "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型。\n" * 6


def test_windows_are_answers(tiny):
    ws = windows(tiny.tokenizer, TEXT, 32)
    assert all(w[:2] == [tiny.tokenizer.gmask_id, tiny.tokenizer.bos_id] for w in ws)
    assert all(len(w) <= 32 for w in ws)
    assert sum(len(w) - 2 for w in ws) == len(tiny.tokenizer.encode(TEXT, False))


def test_perplexity_matches_manual_cross_entropy(tiny):
    r = evaluate(tiny, TEXT, window=64)
    nll, n = 0.0, 0
    for ids in windows(tiny.tokenizer, TEXT, 64):
        lg = tiny.logits(ids)
        for t in range(1, len(ids) - 1):
            nll -= lg[t].log_softmax(-1)[ids[t + 1]].item()
            n += 1
    assert r.tokens == n
    assert math.isclose(r.nll, nll / n, rel_tol=1e-5)


def test_self_reference_agrees_fully(tiny):
    r = evaluate(tiny, TEXT, window=64, reference=tiny)
    assert r.top1_agreement == 1.0 and r.kl == pytest.approx(0, abs=1e-6)


def test_int8_costs_less_than_int4(tiny, tiny_dir):
    q8 = localglm.load(tiny_dir, precision="int8", compute_dtype="float32", device="cpu")
    q4 = localglm.load(tiny_dir, precision="int4", compute_dtype="float32", device="cpu")
    r8 = evaluate(q8, TEXT, 64, reference=tiny)
    r4 = evaluate(q4, TEXT, 64, reference=tiny)
    assert r8.kl < r4.kl and r8.top1_agreement >= r4.top1_agreement


def test_eval_command(tmp_path, tiny_dir, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert cli.main(["eval", str(tiny_dir), "--precision", "int8", "--text", str(f),
                     "--reference", str(tiny_dir), "--reference-precision", "float32"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "top-1 agreement" in out
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    assert cli.main(["eval", str(tiny_dir), "--text", str(tmp_path / "e.txt")]) == 1
