"""Who may use the server: CORS for browser SDKs, and the web chat under the API's policy."""

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import running_server  # noqa: E402

SITE = "https://x.example"
# What the official OpenAI JS SDK asks for in its preflight.
SDK_HEADERS = ("authorization,content-type,x-stainless-arch,x-stainless-lang,"
               "x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
               "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout")
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def preflight(base, path, origin, headers=SDK_HEADERS):
    return httpx.options(f"{base}{path}", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers})


def test_the_openai_js_sdk_preflight_is_allowed_for_an_allowed_origin(tiny):
    with running_server(tiny, cors_origins=[SITE]) as (base, _):
        r = preflight(base, "/v1/chat/completions", SITE)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == SITE
        allowed = r.headers["access-control-allow-headers"].lower()
        assert all(h in allowed for h in SDK_HEADERS.split(","))
        r = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30,
                       headers={"Origin": SITE, "x-stainless-lang": "js"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == SITE
        # Another site gets no grant, whatever it asks.
        r = preflight(base, "/v1/chat/completions", "https://evil.example")
        assert "access-control-allow-origin" not in r.headers


@pytest.fixture(scope="module")
def gradio():
    return pytest.importorskip("gradio", reason="the web UI needs gradio (localglm[serve])")


@pytest.mark.parametrize("cors", [[], [SITE]], ids=["no-cors-origin", "one-cors-origin"])
def test_the_web_chat_grants_no_cors_to_other_origins(gradio, tiny, cors):
    # gradio on its own echoes any http://localhost:* origin, with credentials.
    with running_server(tiny, webui=True, cors_origins=cors) as (base, _):
        for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "null"):
            for path in ("/chat/config", "/chat/gradio_api/info"):
                r = httpx.get(f"{base}{path}", headers={"Origin": origin})
                assert r.status_code == 200
                assert "access-control-allow-origin" not in r.headers, (origin, path)
                assert "access-control-allow-credentials" not in r.headers
                r = preflight(base, "/chat/gradio_api/queue/join", origin, "content-type")
                assert "access-control-allow-origin" not in r.headers, (origin, path)
        if cors:  # an allowed origin is allowed on the web chat too, without credentials
            r = httpx.get(f"{base}/chat/config", headers={"Origin": SITE})
            assert r.headers["access-control-allow-origin"] == SITE
            assert "access-control-allow-credentials" not in r.headers


def call_send(base, headers=None):
    """Start the web chat's send function through gradio's HTTP API."""
    return httpx.post(f"{base}/chat/gradio_api/call/send", headers=headers, timeout=30,
                      json={"data": ["hi", [], 12, 0.7, 0]})


def test_with_an_api_key_the_web_chat_routes_need_the_key_or_a_login(gradio, tiny):
    with running_server(tiny, webui=True, api_key="k3y") as (base, _):
        assert call_send(base).status_code == 401
        for wrong in ("Bearer nope", "k3y", "Basic k3y"):
            r = call_send(base, {"Authorization": wrong})
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/chat/config",
                         headers={"Authorization": "Bearer nope"}).status_code == 401
        good = {"Authorization": "Bearer k3y"}
        assert httpx.get(f"{base}/chat/config", headers=good).status_code == 200
        assert call_send(base, good).status_code != 401
        # The login session works as before.
        with httpx.Client(base_url=base) as browser:
            r = browser.post("/chat/login", data={"username": "me", "password": "k3y"})
            assert r.status_code == 200
            assert browser.get("/chat/config").status_code == 200


def test_the_web_login_takes_an_empty_user_name(gradio, tiny):
    # The login page says "any user name": that includes none.
    with running_server(tiny, webui=True, api_key="k3y") as (base, _):
        for data in ({"username": "", "password": "k3y"}, {"username": "  ", "password": "k3y"},
                     {"password": "k3y"}):
            with httpx.Client(base_url=base) as browser:
                r = browser.post("/chat/login", data=data)
                assert r.status_code == 200 and r.json() == {"success": True}, r.text
                assert browser.get("/chat/config").status_code == 200
        with httpx.Client(base_url=base) as browser:
            r = browser.post("/chat/login", data={"username": "", "password": "wrong"})
            assert r.status_code == 400
            assert browser.get("/chat/config").status_code == 401
