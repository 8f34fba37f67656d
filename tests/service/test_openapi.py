"""The OpenAPI document is complete, and the server conforms to it under fuzzing.

Schemathesis generates requests from ``/openapi.json`` and sends them to a real
server on 127.0.0.1. The run is bounded by a few examples per operation.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.service.conftest import LiveServer

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed; install the dev extra"
)
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_OPERATION = 12


def test_every_operation_documented(live_server: LiveServer):
    with live_server.client() as client:
        document = client.get("/openapi.json").json()

    assert document["components"]["securitySchemes"].keys() == {
        "HTTPBearer",
        "APIKeyHeader",
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            name = f"{method.upper()} {path}"
            assert operation.get("tags"), name
            assert operation.get("summary"), name
            responses = operation["responses"]
            if path.startswith("/v1/"):
                for status in ("401", "422", "429", "503"):
                    assert status in responses, f"{name} lacks {status}"
            for status, response in responses.items():
                assert response.get("description"), f"{name} {status}"
                media = response.get("content", {}).get("application/json")
                if media is None:
                    continue
                if "example" in media:
                    continue
                # A union response lists each model under anyOf.
                schemas = media["schema"].get("anyOf", [media["schema"]])
                for schema in schemas:
                    model = schema["$ref"].rsplit("/", 1)[-1]
                    examples = document["components"]["schemas"][model].get("examples")
                    assert examples, f"{name} {status} {model} has no example"
            body = operation.get("requestBody")
            if body is not None:
                for media_type, media in body["content"].items():
                    assert "example" in media, f"{name} {media_type} has no example"


def test_fuzzed_requests_conform(live_server: LiveServer):
    with httpx.Client(base_url=live_server.url) as client:
        # A few items, so searches by id and item lookups can find something.
        vector = [1.0] + [0.0] * 31
        client.post("/v1/items", json={"items": [{"id": "cat-1", "vector": vector}]})

    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    statuses: list[int] = []

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(checks=checks)
            statuses.append(response.status_code)

        check()

    # The run really exercised the server, with both accepted and rejected input.
    assert len(statuses) >= 3 * len(operations)
    assert any(status < 300 for status in statuses)
    assert any(400 <= status < 500 for status in statuses)
