"""`localglm quantize -o DST`: a bad destination fails first, in one line, and leaves nothing."""

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from broken_models import run_cli
from safetensors import SafetensorError

import localglm.weights as weights
from localglm import cli


def quantize(src, dst):
    return run_cli("quantize", src, "-o", dst, "--precision", "int8")


def assert_one_line_error(r, line):
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [line]
    assert r.stdout == ""


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A real tmpfs at ``path`` (needs root and mount(8)); skips the test otherwise."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True) if shutil.which("mount") else None
    if r is None or r.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_output_is_a_file(tmp_path, tiny_dir):
    f = tmp_path / "model.bin"
    f.write_text("keep me")
    assert_one_line_error(quantize(tiny_dir, f),
                          f"error: {f} is a file; choose a new directory for the output")
    r = quantize(tiny_dir, f / "sub")
    assert_one_line_error(r, f"error: {f} is a file, so {f / 'sub'} cannot be created; choose "
                          "another output directory")
    assert f.read_text() == "keep me"


def test_output_not_empty_is_refused_before_reading_the_model(tmp_path, tiny_dir, monkeypatch,
                                                              capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    def no_reading(*a, **k):
        raise AssertionError("the model was read")

    monkeypatch.setattr(weights, "read_file", no_reading)
    monkeypatch.setattr(weights, "read_header", no_reading)
    assert cli.main(["quantize", str(tiny_dir), "-o", str(out), "--precision", "int4"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out} exists and is not empty; choose a new output directory"]
    assert leftovers(out) == ["notes.txt"]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_output_in_proc(tiny_dir):
    assert_one_line_error(quantize(tiny_dir, "/proc/localglm-out"),
                          "error: cannot create /proc/localglm-out: /proc does not accept new "
                          "directories (No such file or directory); choose an output directory "
                          "you can write to")


def test_missing_parents_are_created(tmp_path, tiny_dir):
    out = tmp_path / "a" / "b" / "int8"
    r = quantize(tiny_dir, out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "ice_text.model", "model.safetensors", "tokenizer_config.json"]
    assert leftovers(out.parent) == ["int8"]


def test_read_only_output(tmp_path, tiny_dir):
    ro = tmp_path / "ro"
    if os.geteuid() != 0:  # root ignores permissions: it takes a read-only mount
        ro.mkdir(mode=0o555)
        reason = "Permission denied"
        ctx = contextlib.nullcontext(ro)
    else:
        reason = "Read-only file system"
        ctx = tmpfs(ro, "size=1m,ro")
    with ctx:
        assert_one_line_error(quantize(tiny_dir, ro / "out"),
                              f"error: cannot create {ro / 'out'}: {ro} does not accept new "
                              f"directories ({reason}); choose an output directory you can "
                              "write to")
        assert leftovers(ro) == []


def test_full_disk_is_found_before_converting(tmp_path, tiny_dir):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        r = quantize(tiny_dir, small / "out")
        assert r.returncode == 1 and r.stdout == ""
        (line,) = r.stderr.splitlines()
        assert line.startswith(f"error: {small / 'out'} needs about ")
        assert line.endswith(f" but {small} has only 0.1 MiB free; free up space or choose an "
                             "output directory on another disk")
        assert leftovers(small) == []


def test_free_space_estimate_is_checked(tmp_path, tiny_dir, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=300 << 10))
    out = tmp_path / "out"
    assert cli.main(["quantize", str(tiny_dir), "-o", str(out), "--precision", "int8"]) == 1
    # int8 weights and head 0.3 MiB + tokenizer 0.27 MiB + headers and slack: about 0.6 MiB
    assert capsys.readouterr().err.splitlines() == [
        f"error: {out} needs about 0.6 MiB but {tmp_path} has only 0.3 MiB free; free up space "
        "or choose an output directory on another disk"]
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=700 << 10))
    assert cli.main(["quantize", str(tiny_dir), "-o", str(out), "--precision", "int8"]) == 0
    written = sum(f.stat().st_size for f in out.iterdir())
    assert 500 << 10 < written < 650 << 10  # the estimate is a little above what is written


def test_disk_full_while_writing_leaves_nothing(tmp_path, tiny_dir, monkeypatch, capsys):
    real_save = weights.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(weights, "save_file", save_half_then_fail)
    out = tmp_path / "new" / "out"
    assert cli.main(["quantize", str(tiny_dir), "-o", str(out), "--precision", "int4"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: cannot write {out}: the disk is full (No space left on device); free up space "
        "or choose an output directory on another disk"]
    assert leftovers(tmp_path) == []  # no temp dir, and the parent made for it is gone too


def test_real_full_disk_while_writing(tmp_path, tiny_dir, monkeypatch, capsys):
    """The free-space check is fooled on purpose, so the write itself meets ENOSPC."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40))
    with tmpfs(tmp_path / "small", "size=128k") as small:
        out = small / "out"
        assert cli.main(["quantize", str(tiny_dir), "-o", str(out), "--precision", "int8"]) == 1
        assert capsys.readouterr().err.splitlines() == [
            f"error: cannot write {out}: the disk is full (No space left on device); free up "
            "space or choose an output directory on another disk"]
        assert leftovers(small) == []
