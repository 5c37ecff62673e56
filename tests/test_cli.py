"""The `localglm` command line, run as a user would."""

import contextlib
import os
import subprocess
import sys

from localglm import cli


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "localglm.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_one_shot_prompt_matches_api(tiny, tiny_dir):
    r = run("chat", str(tiny_dir), "-p", "你好", "--temperature", "0", "--max-length", "25",
            "--precision", "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tiny.chat("你好", max_length=25, do_sample=False)[0]


def test_prompt_from_stdin(tiny, tiny_dir):
    r = run("chat", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "6",
            "--precision", "float32", stdin="你好\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tiny.chat("你好", max_new_tokens=6, do_sample=False)[0]


def test_user_errors_are_one_line_not_tracebacks(tmp_path):
    r = run("chat", str(tmp_path / "missing"), "-p", "hi")
    assert r.returncode == 1
    assert r.stderr.startswith("error: model directory") and "Traceback" not in r.stderr


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
