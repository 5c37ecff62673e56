"""The served OpenAPI description, /docs, and a bounded schemathesis run against it."""

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import CappedModel, running_server  # noqa: E402

BODIES = {"/v1/chat/completions": "ChatCompletionRequest",
          "/v1/completions": "CompletionRequest", "/v1/embeddings": "EmbeddingRequest",
          "/": "ApiPyRequest"}
ANSWERS = {"/v1/chat/completions": "ChatCompletion", "/v1/completions": "Completion",
           "/v1/embeddings": "EmbeddingList", "/": "ApiPyResponse"}


@pytest.fixture(scope="module")
def server(tiny):
    # Every answer is cut at 4 tokens: the fuzzer may ask for the whole context.
    with running_server(CappedModel(tiny, 4), queue_size=64) as (base, _):
        yield base


@pytest.fixture(scope="module")
def openapi(server):
    r = httpx.get(f"{server}/openapi.json")
    assert r.status_code == 200
    return r.json()


def ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def test_request_bodies_and_answers_are_declared(openapi):
    schemas = openapi["components"]["schemas"]
    for path, model in BODIES.items():
        op = openapi["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == ref(model)
        assert op["responses"]["200"]["content"]["application/json"]["schema"] == ref(
            ANSWERS[path])
        for status in ("400", "401", "413", "429"):
            error = op["responses"][status]["content"]["application/json"]["schema"]
            assert error == ref("ErrorResponse")
    chat = schemas["ChatCompletionRequest"]
    assert "messages" in chat["required"]
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    assert "text/event-stream" in openapi["paths"]["/v1/chat/completions"]["post"][
        "responses"]["200"]["content"]
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    assert openapi["paths"]["/v1/models"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"] == ref("ModelList")


def test_docs_are_served(server):
    r = httpx.get(f"{server}/docs")
    assert r.status_code == 200 and "/openapi.json" in r.text


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_makes_a_server_error(case):
    """Whatever the fuzzer sends, the answer is never a 5xx."""
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance,
                                   status_code_conformance])
