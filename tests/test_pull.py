"""`localglm pull` against a Hugging Face Hub on loopback, with the real huggingface_hub client."""

import functools
import hashlib
import sys
import threading
import types
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import DATA, TINY
from hub_server import FakeHub, free_port, isolate_hf, serving

from localglm import cli

REPO = "THUDM/chatglm-6b"
SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"
CODE = {"modeling_chatglm.py": b"raise SystemExit('remote code ran')\n",
        "configuration_chatglm.py": b"raise SystemExit('remote code ran')\n",
        "quantization.py": b"raise SystemExit('remote code ran')\n"}
FIXTURE_FILES = sorted(p.name for p in TINY.iterdir() if p.is_file())


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    return isolate_hf(monkeypatch, tmp_path)


@pytest.fixture
def hub(hf_env):
    """(FakeHub, base URL): THUDM/chatglm-6b is the tiny fixture plus the official .py files."""
    fake = FakeHub()
    fake.add_dir(REPO, TINY, extra=CODE)
    fake.add_dir("THUDM/chatglm-6b-int4", DATA / "chatglm-6b-tiny-int4", extra=CODE)
    with serving(fake) as url:
        yield fake, url


def pull(capsys, *args):
    """(exit code, stdout, the error line or all of stderr) of `localglm pull ARGS`."""
    rc = cli.main(["pull", *args])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return rc, out, errors[-1] if errors else err


def snapshot(cache, fake, repo=REPO):
    return cache / ("models--" + repo.replace("/", "--")) / "snapshots" / fake.commits[repo]


def test_pull_then_chat_by_id(hub, hf_env, capsys, tiny):
    fake, url = hub
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 0, err
    commit = fake.commits[REPO]
    assert f"source:      {url}/{REPO} (revision main, commit {commit[:12]})" in out
    assert f"destination: {hf_env / 'models--THUDM--chatglm-6b'}" in out
    assert ("not fetched: modeling_chatglm.py, configuration_chatglm.py, quantization.py "
            "(model code: localglm never downloads or runs it)") in out
    assert f"chat with: localglm chat {REPO}" in out
    snap = snapshot(hf_env, fake)
    assert sorted(p.name for p in snap.iterdir()) == FIXTURE_FILES
    for name in FIXTURE_FILES:
        assert (snap / name).read_bytes() == (TINY / name).read_bytes()

    rc = cli.main(["chat", REPO, "-p", "你好", "--temperature", "0", "--max-new-tokens", "6",
                   "--precision", "float32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == tiny.chat("你好", max_new_tokens=6, do_sample=False)[0]


def test_model_code_is_never_requested_or_written(hub, hf_env, capsys):
    fake, url = hub
    assert pull(capsys, REPO, "--endpoint", url)[0] == 0
    assert fake.requested_files() == set(FIXTURE_FILES)
    assert not [r for r in fake.requests if r.path.endswith(".py")]
    assert list(hf_env.rglob("*.py")) == []


def test_hf_endpoint_environment_and_int4_repo(hub, hf_env, capsys, monkeypatch):
    fake, url = hub
    monkeypatch.setenv("HF_ENDPOINT", url)
    rc, out, err = pull(capsys, "THUDM/chatglm-6b-int4")
    assert rc == 0, err
    assert f"source:      {url}/THUDM/chatglm-6b-int4 (revision main" in out
    assert "done: THUDM/chatglm-6b-int4 (int4) is complete" in out
    assert (snapshot(hf_env, fake, "THUDM/chatglm-6b-int4") / "pytorch_model.bin").read_bytes() \
        == (DATA / "chatglm-6b-tiny-int4" / "pytorch_model.bin").read_bytes()


def test_dropped_connection_resumes_mid_file(hub, hf_env, capsys):
    fake, url = hub
    fake.drop_after[SHARD1] = 200_000  # hang up after 200 KB of the 510 KB shard, once
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 0, err
    ranges = [r.range for r in fake.gets(SHARD1)]
    # The retry asks only for the rest: from the last whole 64 KiB block received.
    assert ranges == [None, f"bytes={3 * 65536}-"]
    assert (snapshot(hf_env, fake) / SHARD1).read_bytes() == (TINY / SHARD1).read_bytes()


def test_failed_pull_is_continued_by_running_it_again(hub, hf_env, capsys):
    fake, url = hub
    fake.fail[SHARD2] = 503
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 1
    assert err.startswith(f"error: {url}/{REPO}: the hub answered 503")

    assert "run the same `localglm pull` again to continue" in err and "Traceback" not in err
    snap = snapshot(hf_env, fake)
    assert (snap / SHARD1).read_bytes() == (TINY / SHARD1).read_bytes()
    assert not (snap / SHARD2).exists()

    del fake.fail[SHARD2]
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 0, err
    assert len(fake.gets(SHARD1)) == 1  # complete files are not fetched again
    assert len(fake.gets(SHARD2)) == 2
    assert (snap / SHARD2).read_bytes() == (TINY / SHARD2).read_bytes()


@pytest.mark.parametrize("name,kind", [(SHARD2, "sha256"), ("config.json", "git blob id")])
def test_corrupted_file_is_named_and_fetched_again(hub, hf_env, capsys, name, kind):
    fake, url = hub
    fake.corrupt[name] = 1  # the first copy served has one wrong byte (same size)
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 0, err
    assert f"checksum mismatch: {name}: {kind} is " in out
    assert "removed, downloading again" in out
    assert len(fake.gets(name)) == 2
    assert (snapshot(hf_env, fake) / name).read_bytes() == (TINY / name).read_bytes()


def test_file_that_stays_corrupted_is_named_and_removed(hub, hf_env, capsys):
    fake, url = hub
    fake.corrupt[SHARD2] = 99
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 1
    want = hashlib.sha256((TINY / SHARD2).read_bytes()).hexdigest()
    assert err.startswith(f"error: {SHARD2}: sha256 is ")
    assert f"expected {want[:16]} after downloading twice from {url}; the file was removed" in err
    assert not (snapshot(hf_env, fake) / SHARD2).exists()
    assert not list(hf_env.rglob(want))  # no blob left under the right name with wrong bytes

    rc = cli.main(["chat", REPO, "-p", "hi"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == (f"error: {REPO} in the Hugging Face cache is incomplete (missing "
                           f"{SHARD2}); run `localglm pull {REPO}` to finish the download")


@pytest.mark.parametrize("command", [["chat", "-p", "hi"], ["serve"]])
def test_missing_id_says_pull_and_downloads_nothing(hub, hf_env, capsys, monkeypatch, command):
    fake, url = hub
    monkeypatch.setenv("HF_ENDPOINT", url)
    rc = cli.main([command[0], "THUDM/chatglm-6b-int4", *command[1:]])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == (
        "error: model 'THUDM/chatglm-6b-int4' is neither a directory nor in the Hugging Face "
        f"cache ({hf_env}); download it with `localglm pull THUDM/chatglm-6b-int4`")
    assert fake.requests == []


def test_revision_and_unknown_names(hub, hf_env, capsys):
    fake, url = hub
    commit = fake.commits[REPO]
    rc, out, err = pull(capsys, REPO, "--endpoint", url, "--revision", commit)
    assert rc == 0, err
    assert f"(revision {commit}, commit {commit[:12]})" in out
    assert f"chat with: localglm chat {snapshot(hf_env, fake)}" in out

    rc, out, err = pull(capsys, REPO, "--endpoint", url, "--revision", "v9")
    assert (rc, err.strip()) == (1, f"error: {url}/{REPO} has no revision 'v9'")
    rc, out, err = pull(capsys, "THUDM/nope", "--endpoint", url)
    assert (rc, err.strip()) == (1, f"error: no model 'THUDM/nope' at {url} (check the id; a "
                                    "private model needs HF_TOKEN)")
    rc, out, err = pull(capsys, "THUDM/chat glm", "--endpoint", url)
    assert rc == 1 and err.startswith("error: 'THUDM/chat glm' is not a model id (")
    rc, out, err = pull(capsys, "chatglm-6b", "--endpoint", url)
    assert (rc, err.strip()) == (1, "error: 'chatglm-6b' is not a model id (ORG/NAME, e.g. "
                                    "THUDM/chatglm-6b)")


def test_unreachable_or_wrong_endpoint_and_offline_mode(hf_env, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hc

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert rc == 1
    assert err.startswith(f"error: cannot reach {url} (") and "hf-mirror.com" in err
    # A web server that is not a hub: its answer to the model info route is a web page.
    page = tmp_path / "site" / "api" / "models" / "THUDM" / "chatglm-6b" / "revision" / "main"
    page.parent.mkdir(parents=True)
    page.write_text("<html>hello</html>")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{web.server_address[1]}"
        rc, out, err = pull(capsys, REPO, "--endpoint", url)
        web.shutdown()
    assert rc == 1
    assert err.startswith(f"error: {url} did not answer like a Hugging Face Hub (")
    assert err.endswith("check --endpoint / HF_ENDPOINT")

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    rc, out, err = pull(capsys, REPO, "--endpoint", url)
    assert (rc, err.strip()) == (1, "error: HF_HUB_OFFLINE is set, so nothing can be "
                                    "downloaded; unset it to pull")


def test_local_dir(hub, tmp_path, capsys):
    fake, url = hub
    dest = tmp_path / "chatglm-6b"
    rc, out, err = pull(capsys, REPO, "--endpoint", url, "--local-dir", str(dest))
    assert rc == 0, err
    assert f"destination: {dest}" in out and f"chat with: localglm chat {dest}" in out
    assert sorted(p.name for p in dest.iterdir() if p.is_file()) == FIXTURE_FILES
    assert list(dest.rglob("*.py")) == []


def test_modelscope_absent_is_a_clear_error(hf_env, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    rc, out, err = pull(capsys, "ZhipuAI/chatglm-6b", "--source", "modelscope")
    assert (rc, err.strip()) == (1, "error: --source modelscope needs the modelscope package: "
                                    'pip install "localglm[modelscope]"')


def test_modelscope_source_uses_the_allow_list(hf_env, tmp_path, capsys, monkeypatch):
    calls = []

    def snapshot_download(model_id, revision=None, local_dir=None, allow_patterns=None,
                          ignore_patterns=None):
        calls.append((model_id, revision, local_dir, allow_patterns, ignore_patterns))
        for name in FIXTURE_FILES:
            (tmp_path / "ms" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "ms" / name).write_bytes((TINY / name).read_bytes())
        (tmp_path / "ms" / "modeling_chatglm.py").write_text("x")  # a misbehaving source
        return str(tmp_path / "ms")

    monkeypatch.setitem(sys.modules, "modelscope",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    rc, out, err = pull(capsys, "ZhipuAI/chatglm-6b", "--source", "modelscope",
                        "--revision", "v1.0.0")
    assert rc == 0, err
    (model_id, revision, local_dir, allow, ignore), = calls
    assert (model_id, revision, local_dir) == ("ZhipuAI/chatglm-6b", "v1.0.0", None)
    assert "ice_text.model" in allow and "*.py" in ignore and not any(".py" in p for p in allow)
    assert "source:      https://modelscope.cn/models/ZhipuAI/chatglm-6b (revision v1.0.0)" in out
    assert f"chat with: localglm chat {tmp_path / 'ms'}" in out
    assert not (tmp_path / "ms" / "modeling_chatglm.py").exists()


def test_pull_help_explains_sources_and_checks(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pull", "--help"])
    out = capsys.readouterr().out
    for text in ("--endpoint", "HF_ENDPOINT=https://hf-mirror.com", "--revision",
                 "--source", "sha256", "never downloaded", "HF_HUB_CACHE"):
        assert text in out
