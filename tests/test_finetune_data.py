"""Reading fine-tuning data: formats, chat-format encoding, truncation, clear errors."""

import json

import pytest
from broken_models import SHARD1, copy_model, run_cli, truncate

from localglm.chat import build_prompt
from localglm.cli import main as cli_main
from localglm.finetune.data import (
    Columns,
    DataError,
    Example,
    Limits,
    encode,
    load_dataset,
    read_examples,
)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)
                              for r in rows) + "\n", encoding="utf-8")
    return path


def test_official_ptuning_format(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"content": "类型#裙", "summary": "这是一条裙子"}, "",
                                           {"content": "q2", "summary": "a2"}])
    examples, fmt = read_examples(f)
    assert fmt == "ptuning"
    assert [(e.query, e.answer, e.history) for e in examples] == [
        ("类型#裙", "这是一条裙子", []), ("q2", "a2", [])]
    assert examples[1].where.endswith("a.jsonl:3")  # blank lines still count


def test_custom_columns_with_history(tmp_path):
    row = {"prompt": "还有呢", "response": "没有了", "hist": [["你好", "你好！"]]}
    f = write_jsonl(tmp_path / "a.jsonl", [row])
    (ex,), fmt = read_examples(f, Columns("prompt", "response", "hist"))
    assert fmt == "ptuning"
    assert ex.prompt == build_prompt("还有呢", [("你好", "你好！")])
    assert ex.prompt.startswith("[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：还有呢")


def test_alpaca_format_and_json_list(tmp_path):
    rows = [{"instruction": "翻译", "input": "hello", "output": "你好"},
            {"instruction": "讲个笑话", "input": "", "output": "哈哈"}]
    f = tmp_path / "alpaca_data.json"
    f.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    examples, fmt = read_examples(f)
    assert fmt == "alpaca"
    assert [(e.prompt, e.answer) for e in examples] == [
        ("翻译\nhello", "你好"), ("讲个笑话", "哈哈")]


def test_chat_format_one_example_per_answer(tmp_path):
    row = {"messages": [{"role": "system", "content": "你是助手"},
                        {"role": "user", "content": "你好"},
                        {"role": "assistant", "content": "你好！"},
                        {"role": "user", "content": "再见"},
                        {"role": "assistant", "content": "再见！"}]}
    examples, fmt = read_examples(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert fmt == "chat"
    assert [(e.query, e.answer, e.history) for e in examples] == [
        ("你是助手\n你好", "你好！", []), ("再见", "再见！", [("你是助手\n你好", "你好！")])]


def test_encoding_is_the_chat_format(tiny):
    tok = tiny.tokenizer
    enc = encode(tok, Example("你好", "我是模型"), Limits())
    prompt = tok.encode("你好")
    answer = tok.encode("我是模型", add_special_tokens=False)
    assert enc.ids == prompt + answer + [tok.eos_id]
    assert prompt[-2:] == [tok.gmask_id, tok.bos_id]
    assert enc.ids[enc.context] == tok.bos_id and not enc.truncated


def test_truncation_official_and_total(tiny, tmp_path):
    tok = tiny.tokenizer
    ex = Example("一二三四五六七八九十" * 5, "甲乙丙丁戊己庚辛壬癸" * 5)
    n_p = len(tok.encode(ex.prompt)) - 2
    n_a = len(tok.encode(ex.answer, add_special_tokens=False))
    enc = encode(tok, ex, Limits(max_source_len=8, max_target_len=6))
    # Official ptuning/main.py: prompt[:max_source_len - 1], answer[:max_target_len - 2].
    assert enc.truncated and enc.context == 7 + 1 and len(enc.ids) == 7 + 2 + 4 + 1
    enc = encode(tok, ex, Limits(max_seq_len=20))
    assert len(enc.ids) == 20 and enc.ids[-1] == tok.eos_id
    assert len(enc.ids) - enc.context - 2 >= (20 - 3) // 2  # the answer keeps half the room
    assert n_p + n_a + 3 > 20
    f = write_jsonl(tmp_path / "t.jsonl", [{"content": ex.query, "summary": ex.answer},
                                           {"content": "hi", "summary": "ok"}])
    ds = load_dataset(f, tok, Limits(max_seq_len=20))
    assert ds.truncated == 1 and "1 truncated" in ds.summary()


@pytest.mark.parametrize("line, message", [
    ('{"content": "a", "summary": ', ":3: not valid JSON"),
    ('{"content": "a"}', ":3: field 'summary' is missing"),
    ('{"content": "a", "summary": 5}', ":3: field 'summary' is a int, not a string"),
    ('["content", "summary"]', ":3: expected a JSON object"),
])
def test_malformed_line_is_named(tmp_path, line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"content": "a", "summary": "b"},
                                             {"content": "c", "summary": "d"}, line])
    with pytest.raises(DataError) as e:
        read_examples(f)
    assert message in str(e.value) and "bad.jsonl" in str(e.value)


def test_bad_chat_and_unknown_format(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"c.jsonl:1: messages\[0\]: unknown role 'bot'"):
        read_examples(f)
    f = write_jsonl(tmp_path / "u.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match="u.jsonl:1: unknown format"):
        read_examples(f)


def test_cli_reports_bad_line_without_traceback(tiny_dir, tmp_path, capsys):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"content": "a", "summary": "b"}, "{oops"])
    code = cli_main(["finetune", str(tiny_dir), "--data", str(f), "-o", str(tmp_path / "out"),
                     "--precision", "float32", "--device", "cpu", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "bad.jsonl:2: not valid JSON" in err and "Traceback" not in err


def test_every_bad_line_is_reported(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ['{"content": "a", "summary": ', {"content": "c"},
                                           {"content": "e", "summary": "f"},
                                           {"content": 1, "summary": "g"}])
    with pytest.raises(DataError) as e:
        read_examples(f)
    assert str(e.value).splitlines() == [
        f"{f}:1: not valid JSON (Expecting value, column 29)",
        f"{f}:2: field 'summary' is missing",
        f"{f}:4: field 'content' is a int, not a string"]


def test_many_bad_lines_are_counted(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["{oops"] * 13 + [{"content": "a", "summary": "b"}])
    with pytest.raises(DataError) as e:
        read_examples(f)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{f}:1: not valid JSON (Expecting property name enclosed in double " \
        "quotes, column 2)"
    assert len(lines) == 11 and lines[-1] == "(and 3 more bad lines)"


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_data_is_checked_before_the_model_is_loaded(tiny_dir, tmp_path, flag):
    """A typo in the data must not cost a model load: the model here could not even load."""
    model = copy_model(tiny_dir, tmp_path / "model")
    truncate(model / SHARD1)
    good = write_jsonl(tmp_path / "good.jsonl", [{"content": "a", "summary": "b"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"content": "a", "summary": "b"},
                                               {"content": "c", "sumary": "d"}])
    data = {"--data": good, "--eval-data": good, flag: bad}
    r = run_cli("finetune", model, "--data", data["--data"], "--eval-data", data["--eval-data"],
                "-o", tmp_path / "out", "--max-steps", "1")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: {bad}:2: field 'summary' is missing"]
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_reported_before_loading(tmp_path):
    r = run_cli("finetune", tmp_path / "no-model", "--data", tmp_path / "nope.jsonl",
                "-o", tmp_path / "out")
    assert (r.returncode, r.stderr) == (1, f"error: {tmp_path / 'nope.jsonl'} does not exist\n")
    r = run_cli("finetune", tmp_path / "no-model", "--data", tmp_path, "-o", tmp_path / "out")
    assert (r.returncode, r.stderr) == (1, f"error: {tmp_path} is a directory; give a .jsonl "
                                        "file\n")


SLOW_NOTE = "CPU can be very slow"


@pytest.mark.parametrize("precision, noted", [("auto", False), ("bfloat16", True)])
def test_slow_dtype_note_only_when_asked_for(tiny_dir, tmp_path, precision, noted):
    data = write_jsonl(tmp_path / "d.jsonl", [{"content": "你好", "summary": "你好！"}])
    r = run_cli("finetune", tiny_dir, "--data", data, "-o", tmp_path / "out", "--device", "cpu",
                "--precision", precision, "--max-steps", "1", "--lora-r", "2")
    assert r.returncode == 0, r.stderr
    assert (SLOW_NOTE in r.stderr) is noted, r.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
