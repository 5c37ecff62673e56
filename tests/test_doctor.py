from broken_models import (
    SHARD1,
    SHARD2,
    copy_model,
    edit_config,
    make_lfs_pointer,
    run_cli,
    truncate,
)

import localglm.cli as cli


def test_doctor_reports_machine_and_choice(capsys, tiny_dir):
    assert cli.main(["doctor", str(tiny_dir), "--max-context", "256"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device cpu:" in out
    for p in ("float32", "float16", "int8", "int4"):
        assert p in out
    assert "localglm picks: bfloat16 on cpu" in out


def test_doctor_for_real_shapes_without_a_model(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "ChatGLM-6B (real shapes)" in out


PULL = "run `git lfs install && git lfs pull` in the model directory"
NOT_LOADABLE = "localglm cannot load it until {} fixed:"


def doctor_report(model):
    """Exit code and the lines after the memory table (the model's verdict)."""
    r = run_cli("doctor", model)
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model "))
    return r.returncode, lines[start:]


def test_doctor_checks_the_model_without_reading_weights(tiny_dir, capsys, monkeypatch):
    import localglm.weights as weights

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(weights, "read_file", no_reading)
    assert cli.main(["doctor", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert f"model {tiny_dir}: config.json, tokenizer and 2 weight file(s) (43 tensors) " \
        "check out\n" in out
    assert "localglm picks: bfloat16 on cpu" in out


def test_doctor_lists_every_lfs_pointer(tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "m")
    for name in (SHARD1, SHARD2, "ice_text.model"):
        make_lfs_pointer(model / name)
    code, lines = doctor_report(model)
    assert code == 1
    assert lines == [
        f"model {model}: 3 problems; " + NOT_LOADABLE.format("they are"),
        f"  {SHARD1} is a Git LFS pointer (a small text file), not the real file: {PULL}",
        f"  {SHARD2} is a Git LFS pointer (a small text file), not the real file: {PULL}",
        f"  ice_text.model is a Git LFS pointer (a small text file), not the real file: {PULL}"]


def test_doctor_truncated_shard(tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "m")
    truncate(model / SHARD2)
    code, lines = doctor_report(model)
    assert code == 1
    assert lines[0] == f"model {model}: 1 problem; " + NOT_LOADABLE.format("it is")
    assert lines[1].startswith(f"  {model / SHARD2} cannot be read (")
    assert lines[1].endswith("the file is probably truncated or corrupted: download it again")
    assert len(lines) == 2


def test_doctor_missing_tokenizer(tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "m")
    (model / "ice_text.model").unlink()
    code, lines = doctor_report(model)
    assert code == 1
    assert lines == [
        f"model {model}: 1 problem; " + NOT_LOADABLE.format("it is"),
        "  ice_text.model is missing: download the complete model directory (e.g. from "
        "THUDM/chatglm-6b), tokenizer files included"]


def test_doctor_config_disagrees_with_weights(tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "m")
    edit_config(model, hidden_size=32)
    code, lines = doctor_report(model)
    assert code == 1
    assert lines[:2] == [
        f"model {model}: 3 problems; " + NOT_LOADABLE.format("they are"),
        "  config.json hidden_size=32 but the weights have 64 (transformer.word_embeddings.weight "
        "is [2344, 64]): set hidden_size to 64, or use the config.json that came with these "
        "weights"]
    assert [line.split(":")[0] for line in lines[2:]] == [
        "  wrong shape (weights vs config.json) in all 3 layers",
        "  wrong shape (weights vs config.json)"]


def test_doctor_broken_config(tmp_path, tiny_dir):
    model = copy_model(tiny_dir, tmp_path / "m")
    (model / "config.json").write_text("{")
    make_lfs_pointer(model / SHARD1)
    r = run_cli("doctor", model)
    assert r.returncode == 1 and "memory for" not in r.stdout
    assert r.stdout.splitlines()[-3:] == [
        f"model {model}: 2 problems; " + NOT_LOADABLE.format("they are"),
        f"  {model / 'config.json'} is not valid JSON (Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1))",
        f"  {SHARD1} is a Git LFS pointer (a small text file), not the real file: {PULL}"]


def test_doctor_on_a_ptuning_checkpoint(tiny_dir):
    ckpt = tiny_dir.parent / "chatglm-6b-tiny-ptuning"
    code, lines = doctor_report(ckpt)
    assert code == 1
    assert lines == [
        f"model {ckpt}: 1 problem; " + NOT_LOADABLE.format("it is"),
        "  it holds only a P-Tuning v2 prefix (transformer.prefix_encoder.*), not a model: use "
        f"it with a base model, e.g. `localglm chat BASE --ptuning {ckpt}`"]


def test_doctor_names_the_quantized_kernels():
    import subprocess
    import sys

    from localglm.quantize import cpu_kernels

    out = subprocess.run([sys.executable, "-m", "localglm.cli", "doctor"], capture_output=True,
                         text=True, timeout=120).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("int8/int4 on the cpu: "))
    if cpu_kernels.isa():
        assert f"numba {cpu_kernels.isa()} kernels for tokens" in line
    else:
        assert "PyTorch's int4/int8 kernels" in line
