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
