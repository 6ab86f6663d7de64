"""GET /openapi.json documents every route the controller serves, with its body and its error answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from kvbus.controller.app import create_app
from kvbus.shared.config import KVBusConfig


@pytest.fixture
def spec(redis_url: str) -> Iterator[dict[str, Any]]:
    with TestClient(create_app(KVBusConfig(redis_url=redis_url))) as client:
        response = client.get("/openapi.json")
        assert response.status_code == 200
        yield response.json()


def test_every_route_is_documented_with_its_errors(spec: dict[str, Any], redis_url: str) -> None:
    routes = create_app(KVBusConfig(redis_url=redis_url)).routes
    served = {(r.path, m.lower()) for r in routes if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert served - {("/openapi.json", "get")} == documented
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert ("503" in op["responses"]) == (path not in ("/", "/metrics")), (path, method)
            if method == "post":
                assert {"400", "422"} <= op["responses"].keys(), path
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.removeprefix("#/components/schemas/") in spec["components"]["schemas"]


def test_the_token_and_the_browser_refusals_are_documented(spec: dict[str, Any]) -> None:
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearer"]["description"],
    }
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            public = path in ("/healthz", "/")
            assert ("401" in op["responses"]) != public and ("security" in op) != public, (path, method)
            if not public:
                assert op["security"] == [{"bearer": []}, {}]  # the token, or none when none is set
            if method == "post":
                assert "cross_origin" in op["responses"]["403"]["description"], path
                assert "unsupported_media_type" in op["responses"]["415"]["description"], path


def test_request_schemas_are_the_validating_structs(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert schemas["ClearRequest"]["required"] == ["instance_id", "location"]
    assert schemas["ClearRequest"]["properties"]["location"] == {"type": "string"}  # any, as LMCache takes
    assert schemas["CompressRequest"]["required"] == ["instance_id", "method", "location"]
    # /compress and /decompress: the methods are listed for clients (an unknown one is still a 400, not a 422)
    method = schemas["CompressRequest"]["properties"]["method"]
    assert method == {"type": "string", "enum": ["int8", "zlib", "zstd", "cachegen"]}
    compress = spec["paths"]["/compress"]["post"]["responses"]
    assert "unknown_method" in compress["400"]["description"] and "unknown_instance" in compress["404"]["description"]
    assert "agent_timeout" in compress["504"]["description"]
