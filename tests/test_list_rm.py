"""`localglm list` and `localglm rm` on a Hugging Face cache filled by `localglm pull`."""

import io
import re
import shutil

import pytest
from conftest import DATA, TINY
from hub_server import FakeHub, isolate_hf, serving

from localglm import cli
from localglm.devices import fmt_bytes
from localglm.inventory import dir_size

REPO, INT4 = "THUDM/chatglm-6b", "THUDM/chatglm-6b-int4"
SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"


def files_size(d):
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch, capsys):
    """A cache holding THUDM/chatglm-6b (fp16) and THUDM/chatglm-6b-int4, pulled for real."""
    hf_cache = isolate_hf(monkeypatch, tmp_path)
    fake = FakeHub()
    fake.add_dir(REPO, TINY, extra={"modeling_chatglm.py": b"x = 1\n"})
    fake.add_dir(INT4, DATA / "chatglm-6b-tiny-int4")
    with serving(fake) as url:
        for repo in (REPO, INT4):
            assert cli.main(["pull", repo, "--endpoint", url]) == 0
    capsys.readouterr()
    return hf_cache


def run_list(capsys, *dirs):
    assert cli.main(["list", *map(str, dirs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines[0], {row[0]: row[1:] for row in (re.split(r"\s{2,}", ln) for ln in lines[2:])}


def test_list_shows_precision_size_and_completeness(cache, tmp_path, capsys):
    lfs = tmp_path / "lfs-clone"  # a git clone made without git-lfs
    shutil.copytree(TINY, lfs, ignore=shutil.ignore_patterns("golden"))
    (lfs / SHARD1).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                              + "0" * 64 + "\nsize 510023\n")
    partial = tmp_path / "partial"
    shutil.copytree(TINY, partial, ignore=shutil.ignore_patterns("golden", SHARD2, "*.model"))
    int8 = DATA / "chatglm-6b-tiny-int8"

    header, rows = run_list(capsys, int8, lfs, partial)
    assert header == f"Hugging Face cache: {cache}"
    assert rows[REPO] == ["main", "fp16", fmt_bytes(files_size(TINY)), "complete"]
    assert rows[INT4] == ["main", "int4", fmt_bytes(files_size(DATA / "chatglm-6b-tiny-int4")),
                          "complete"]
    assert rows[str(int8)] == ["-", "int8", fmt_bytes(files_size(int8)), "complete"]
    assert rows[str(lfs)][:2] == ["-", "fp16"]
    assert rows[str(lfs)][3] == (f"incomplete: Git LFS pointers instead of files: {SHARD1} "
                                 "(run `git lfs pull` there)")
    assert rows[str(partial)][3] == f"incomplete: missing {SHARD2}, ice_text.model"


def test_list_reports_an_interrupted_pull(tmp_path, monkeypatch, capsys):
    isolate_hf(monkeypatch, tmp_path)
    fake = FakeHub()
    fake.add_dir(REPO, TINY)
    fake.fail[SHARD2] = 503
    with serving(fake) as url:
        assert cli.main(["pull", REPO, "--endpoint", url]) == 1
    capsys.readouterr()
    _, rows = run_list(capsys)
    assert rows[REPO][3] == f"incomplete: missing {SHARD2}"


def test_list_follows_hf_home(tmp_path, monkeypatch, capsys):
    isolate_hf(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert cli.main(["list"]) == 0
    assert capsys.readouterr().out == (
        f"Hugging Face cache: {tmp_path / 'elsewhere' / 'hub'}\n"
        "no models; download one with `localglm pull THUDM/chatglm-6b-int4`\n")


def test_rm_asks_then_frees_the_space(cache, capsys, monkeypatch):
    size = dir_size(cache / "models--THUDM--chatglm-6b")  # the weights plus the cache's records
    assert files_size(TINY) < size < files_size(TINY) + 4096
    before = dir_size(cache)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert cli.main(["rm", REPO]) == 1
    out, err = capsys.readouterr()
    assert out == f"{REPO}: 1 revision (main), {fmt_bytes(size)} in {cache}\ndelete it? [y/N] "
    assert err == "nothing deleted (-y deletes without asking)\n"
    assert dir_size(cache) == before

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert cli.main(["rm", REPO]) == 0
    assert capsys.readouterr().out.endswith(f"deleted {REPO}, freed {fmt_bytes(size)}\n")
    assert not (cache / "models--THUDM--chatglm-6b").exists()
    assert dir_size(cache) == before - size
    _, rows = run_list(capsys)
    assert list(rows) == [INT4]

    assert cli.main(["rm", INT4, "-y"]) == 0
    assert capsys.readouterr().out.startswith(f"{INT4}: 1 revision (main), ")
    assert cli.main(["rm", INT4, "-y"]) == 1
    assert capsys.readouterr().err == (f"error: {INT4} is not in the Hugging Face cache "
                                       f"({cache}); `localglm list` shows what is\n")


def test_rm_removes_an_unfinished_download(tmp_path, monkeypatch, capsys):
    cache = isolate_hf(monkeypatch, tmp_path)
    blobs = cache / "models--THUDM--chatglm-6b" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "0123.abcd.incomplete").write_bytes(b"x" * 5000)
    assert cli.main(["rm", REPO, "-y"]) == 0
    assert capsys.readouterr().out == (f"{REPO}: an unfinished download, {fmt_bytes(5000)} in "
                                       f"{cache}\ndeleted {REPO}, freed {fmt_bytes(5000)}\n")
    assert not (cache / "models--THUDM--chatglm-6b").exists()


def test_help_texts(capsys):
    for command, texts in (("list", ["HF_HUB_CACHE", "int4", "LFS pointer"]),
                           ("rm", ["-y", "space freed"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for text in texts:
            assert text in out, (command, text)
