"""The `localglm` command line, run as a user would."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from localglm import cli

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).parent / "cli_runner.py"
HEAVY = ("torch", "numpy", "safetensors", "sentencepiece")


def env(**extra):
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": path, **extra}


def run(*args, stdin=None, runner=("-m", "localglm.cli"), **extra):
    return subprocess.run([sys.executable, *runner, *args], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env(**extra))


def test_one_shot_prompt_matches_api(tiny, tiny_dir):
    r = run("chat", str(tiny_dir), "-p", "你好", "--temperature", "0", "--max-length", "25",
            "--precision", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tiny.chat("你好", max_length=25, do_sample=False)[0]
    # The start-up line says what runs where, on stderr so that stdout is only the answer.
    assert f"localglm: {tiny_dir}: float32 weights on cpu" in r.stderr


def test_prompt_from_stdin(tiny, tiny_dir):
    r = run("chat", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "6",
            "--precision", "float32", stdin="你好\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tiny.chat("你好", max_new_tokens=6, do_sample=False)[0]


def test_answer_is_shown_post_processed_and_whole(tiny_dir):
    reply = ["我训练于", "[[", "训练", "时间", "]]", ",", "你好", "!"]
    r = run("chat", str(tiny_dir), "-p", "你是谁", "--precision", "float32",
            runner=(str(RUNNER),), LOCALGLM_TEST_REPLY=json.dumps(reply))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "我训练于2023年，你好！\n"


def test_user_errors_are_one_line_not_tracebacks(tmp_path):
    r = run("chat", str(tmp_path / "missing"), "-p", "hi")
    assert r.returncode == 1
    assert r.stderr.startswith("error: model directory") and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "must be a number >= 0 (0 = greedy), not nan"),
    ("--temperature", "-1", "must be a number >= 0 (0 = greedy), not -1"),
    ("--top-k", "-5", "must be a whole number >= 0 (0 = off), not -5"),
    ("--top-p", "0", "must be a number in (0, 1], not 0"),
    ("--top-p", "1.5", "must be a number in (0, 1], not 1.5"),
    ("--max-context", "0", "must be at least 1, not 0"),
    ("--max-new-tokens", "ten", "'ten' is not a whole number"),
])
def test_out_of_range_flags_are_refused(tiny_dir, flag, value, message):
    r = run("chat", str(tiny_dir), "-p", "hi", flag, value)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == f"localglm chat: error: argument {flag}: {message}"


@pytest.mark.parametrize("flag", ["--max-context", "--max-length"])
def test_limits_beyond_the_models_context_are_refused(tiny_dir, flag):
    r = run("chat", str(tiny_dir), "-p", "hi", flag, "100000")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"error: {flag} 100000 is more than the 256 tokens of the model's "
                        f"context ({tiny_dir / 'config.json'}: max_sequence_length); use at "
                        "most 256\n")


def test_message_too_long_is_explained_in_flags(tiny_dir):
    r = run("chat", str(tiny_dir), "-p", "很长" * 200, "--precision", "float32")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("error: your message is ")
    assert last.endswith(" tokens; with 1 token left for the answer it does not fit the "
                         "model's 256-token context: shorten it")


def test_group_size_needs_int4(tiny_dir, tmp_path):
    out = tmp_path / "q"
    r = run("quantize", str(tiny_dir), "-o", str(out), "--precision", "int8",
            "--group-size", "64")
    assert r.returncode == 1 and not out.exists()
    assert r.stderr == ("error: --group-size applies to --precision int4 only, not int8; "
                        "leave it out\n")


@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"], ["--version"], ["-V"]])
def test_help_and_version_do_not_load_pytorch(args):
    r = run(*args, runner=("-X", "importtime", "-m", "localglm.cli"))
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert "localglm.errors" in imported  # the listing works
    if "chat" in args:
        assert "localglm.options" in imported  # the flags come from GenerationConfig
    assert not [m for m in imported if m.split(".")[0] in HEAVY]
    if "-V" in args or "--version" in args:
        assert r.stdout == "localglm 0.1.0\n"


def test_numpy_is_a_declared_dependency():
    # Without it torch prints "Failed to initialize NumPy" on the first run.
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    assert re.search(r'^\s*"numpy[>=<]', dependencies, re.M)


def test_help_lists_commands():
    text = cli.build_parser().format_help()
    assert "chat" in text


def test_chat_help_explains_generation_flags(capsys):
    with contextlib.suppress(SystemExit):
        cli.main(["chat", "--help"])
    out = capsys.readouterr().out
    for flag in ("--temperature", "--top-p", "--max-length", "--seed", "--history", "-p"):
        assert flag in out
    assert "0 means greedy" in out
