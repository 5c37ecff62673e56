"""`localglm chat` in a terminal (a pseudo-terminal): commands, Ctrl-C, saving."""

import json
import os
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).parent / "cli_runner.py"
QUIT_HINT = "(type stop or press Ctrl-D to quit)"


def start(tiny_dir, reply, delay=0.0):
    """An interactive chat whose answers are ``reply`` (a list of text pieces)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TERM": "dumb", "PYTHONIOENCODING": "utf-8",
           "LOCALGLM_TEST_REPLY": json.dumps(reply), "LOCALGLM_TEST_DELAY": str(delay)}
    chat = pexpect.spawn(sys.executable, [str(RUNNER), "chat", str(tiny_dir), "--precision",
                                          "float32"], env=env, encoding="utf-8", timeout=60)
    chat.expect("用户: ")
    return chat


def say(chat, line):
    """Send ``line``; everything printed until the next prompt."""
    chat.sendline(line)
    chat.expect("用户: ")
    return chat.before.replace("\r\n", "\n")


def saved(chat, path):
    assert "(saved" in say(chat, f"/save {path}")
    return json.loads(Path(path).read_text(encoding="utf-8"))["history"]


def test_commands_are_whole_lines_and_typos_are_not_sent(tiny_dir, tmp_path):
    chat = start(tiny_dir, ["好的"])
    assert "ChatGLM: 好的\n" in say(chat, "stop smoking: any tips?")
    assert "ChatGLM: 好的\n" in say(chat, "clear skies: what do they mean?")
    out = say(chat, "/sav x.json")
    assert "unknown command /sav\ncommands" in out and "ChatGLM" not in out
    assert "unknown command /foo" in say(chat, "/foo")
    assert saved(chat, tmp_path / "c.json") == [
        ["stop smoking: any tips?", "好的"], ["clear skies: what do they mean?", "好的"]]
    missing = tmp_path / "no" / "dir" / "x.json"
    assert (f"error: cannot save to {missing}: the folder {missing.parent} does not exist; "
            "create it or choose another file") in say(chat, f"/save {missing}")
    assert "(conversation cleared)" in say(chat, "clear")
    assert saved(chat, tmp_path / "d.json") == []
    chat.sendline("stop")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_keeps_the_session(tiny_dir, tmp_path):
    chat = start(tiny_dir, [f"第{i}句。" for i in range(100)], delay=0.1)
    chat.sendintr()  # at an empty prompt: says how to quit, does not quit
    chat.expect_exact(QUIT_HINT)
    chat.expect("用户: ")
    chat.sendline("讲个长故事")
    chat.expect_exact("ChatGLM: 第0句。")
    chat.sendintr()  # while the answer streams: stops it, keeps the session
    chat.expect_exact(" [stopped]")
    shown = "第0句。" + chat.before.replace("^C", "")
    chat.expect("用户: ")
    history = saved(chat, tmp_path / "c.json")
    assert len(history) == 1 and history[0][0] == "讲个长故事"
    assert 0 < len(history[0][1]) < len("".join(f"第{i}句。" for i in range(100)))
    assert shown.endswith(history[0][1])  # what is kept is what was shown
    chat.send("\x04")  # Ctrl-D
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
