"""`localglm serve`: options, start-up messages, and serving without the web UI extra."""

import sys

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from localglm import cli  # noqa: E402


@pytest.fixture
def started(monkeypatch):
    """Run `localglm serve` up to uvicorn.run and keep what it was given."""
    seen = {}

    def fake_run(app, **kwargs):
        seen.update(kwargs, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    return seen


def serve(tiny_dir, *extra):
    return cli.main(["serve", str(tiny_dir), "--precision", "float32", "--device", "cpu",
                     *extra])


def test_defaults_bind_loopback_without_key_or_cors(started, tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("LOCALGLM_API_KEY", raising=False)
    assert serve(tiny_dir, "--no-webui") == 0
    assert (started["host"], started["port"]) == ("127.0.0.1", 8000)
    err = capsys.readouterr().err
    assert "warning" not in err and "http://127.0.0.1:8000/v1" in err
    client = TestClient(started["app"])
    assert client.get("/v1/models").status_code == 200
    r = client.options("/v1/models", headers={"Origin": "http://a.example",
                                              "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


def test_public_host_warns_and_key_comes_from_the_environment(started, tiny_dir, capsys,
                                                              monkeypatch):
    monkeypatch.setenv("LOCALGLM_API_KEY", "from-env")
    assert serve(tiny_dir, "--host", "0.0.0.0", "--port", "8123", "--no-webui",
                 "--cors-origin", "http://a.example") == 0
    err = capsys.readouterr().err
    assert "warning: listening on 0.0.0.0" in err
    assert started["host"] == "0.0.0.0" and started["port"] == 8123
    client = TestClient(started["app"])
    assert client.get("/v1/models").status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": "Bearer from-env",
                                           "Origin": "http://a.example"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://a.example"


def test_without_gradio_the_api_is_served_and_the_hint_printed(started, tiny_dir, capsys,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # "not installed"
    monkeypatch.delitem(sys.modules, "localglm.server.webui", raising=False)
    assert serve(tiny_dir) == 0
    err = capsys.readouterr().err
    assert "web chat     unavailable" in err and 'pip install "localglm[serve]"' in err
    client = TestClient(started["app"])
    assert client.get("/").json()["webui"].startswith("the web UI needs gradio")
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("args,message", [
    (["--port", "0"], "--port"), (["--queue-size", "0"], "--queue-size"),
    (["--max-body", "10"], "--max-body"),
])
def test_bad_options_are_one_line_errors(started, tiny_dir, capsys, args, message):
    assert serve(tiny_dir, *args) == 1
    assert message in capsys.readouterr().err
    assert not started
