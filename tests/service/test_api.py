"""The HTTP API on a real uvicorn server, real ONNX Runtime, SQLite and FAISS."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import DIM, LiveServer, encode, random_image


def png(seed: int, size=(40, 32)) -> bytes:
    return encode(random_image(seed, size=size))


def add_image(client: httpx.Client, item_id: str, data: bytes, **metadata):
    form = {"id": item_id}
    if metadata:
        form["metadata"] = json.dumps(metadata)
    return client.post(
        "/v1/items", data=form, files={"image": ("a.png", data, "image/png")}
    )


def search_image(client: httpx.Client, data: bytes, k: int = 10) -> httpx.Response:
    return client.post(
        "/v1/search", data={"k": str(k)}, files={"image": ("q.png", data, "image/png")}
    )


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.fixture
def client(live_server: LiveServer):
    with live_server.client() as c:
        yield c


def test_probes(client: httpx.Client):
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").status_code == 200
    assert "dcl_stage_seconds" in client.get("/metrics").text
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/search", "/v1/items", "/v1/items/{item_id}"} <= set(paths)


def test_embed_several_images(client: httpx.Client):
    files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(3)]
    response = client.post("/v1/embed", files=files)
    assert response.status_code == 200
    body = response.json()
    assert body["dim"] == DIM
    assert len(body["model"]["sha256"]) == 64
    embeddings = np.asarray(body["embeddings"])
    assert embeddings.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # The same image gives the same embedding in another request.
    again = client.post("/v1/embed", files=[files[1]]).json()["embeddings"][0]
    np.testing.assert_allclose(again, embeddings[1], atol=1e-6)


def test_add_get_search_delete(client: httpx.Client):
    for i in range(6):
        response = add_image(client, f"img-{i}", png(i), label=f"L{i}")
        assert response.status_code == 201, response.text
        assert response.json()["created"] is True
        assert response.json()["has_thumbnail"] is True

    item = client.get("/v1/items/img-2").json()
    assert item["metadata"] == {"label": "L2"}
    thumbnail = client.get("/v1/items/img-2/thumbnail")
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.content[:2] == b"\xff\xd8"

    results = search_image(client, png(3), k=4).json()["results"]
    assert len(results) == 4
    assert results[0]["id"] == "img-3"
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["metadata"] == {"label": "L3"}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)

    assert len(search_image(client, png(3), k=100).json()["results"]) == 6

    by_id = client.post("/v1/search", json={"id": "img-3", "k": 3}).json()["results"]
    assert len(by_id) == 3
    assert "img-3" not in [r["id"] for r in by_id]

    assert client.delete("/v1/items/img-3").json() == {"id": "img-3", "deleted": True}
    after = search_image(client, png(3), k=10).json()["results"]
    assert "img-3" not in [r["id"] for r in after]
    assert len(after) == 5
    assert client.get("/v1/items/img-3").status_code == 404
    assert client.delete("/v1/items/img-3").status_code == 404

    index = client.get("/v1/index").json()
    assert index["size"] == 5
    assert index["kind"] == "exact"
    assert index["dim"] == DIM
    assert index["applied_seq"] == 7


def test_replace_by_image(client: httpx.Client):
    add_image(client, "x", png(1), v=1)
    response = add_image(client, "x", png(2), v=2)
    assert response.status_code == 201
    assert response.json()["created"] is False
    assert client.get("/v1/index").json()["size"] == 1
    results = search_image(client, png(2), k=1).json()["results"]
    assert results[0]["metadata"] == {"v": 2}
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_batch_add_by_vector_and_search(client: httpx.Client):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, DIM))
    payload = {
        "items": [
            {"id": f"v{i}", "vector": (v * 3).tolist(), "metadata": {"i": i}}
            for i, v in enumerate(vectors)
        ]
    }
    response = client.post("/v1/items", json=payload)
    assert response.status_code == 201, response.text
    assert [item["id"] for item in response.json()["items"]] == [
        f"v{i}" for i in range(5)
    ]
    assert client.get("/v1/items/v0").json()["has_thumbnail"] is False
    assert client.get("/v1/items/v0/thumbnail").status_code == 404

    query = {"vector": vectors[2].tolist(), "k": 2}
    results = client.post("/v1/search", json=query).json()["results"]
    assert results[0]["id"] == "v2"
    # The stored vector was scaled to unit norm, so the self-score is 1.
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_ids_with_slashes(client: httpx.Client):
    assert add_image(client, "cats/tabby 1.png", png(5)).status_code == 201
    assert client.get("/v1/items/cats/tabby 1.png").json()["id"] == "cats/tabby 1.png"
    assert client.get("/v1/items/cats%2Ftabby%201.png/thumbnail").status_code == 200
    assert client.delete("/v1/items/cats/tabby 1.png").status_code == 200


def test_model_info(client: httpx.Client):
    body = client.get("/v1/model").json()
    assert body["provider"] == "CPUExecutionProvider"
    assert body["bundle"]["embedding_dim"] == DIM
    assert body["bundle"]["architecture"] == "tiny-test-cnn"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "field", "text"),
    [
        (
            {"files": {"images": ("a.png", b"not an image", "image/png")}},
            400,
            "images",
            "could not be decoded",
        ),
        (
            {"files": {"other": ("a.png", b"x", "image/png")}},
            422,
            "images",
            "field required",
        ),
        ({"json": {"images": []}}, 415, "Content-Type", "multipart/form-data"),
        (
            {"files": {"images": ("a.png", b"", "image/png")}},
            400,
            "images",
            "empty",
        ),
    ],
)
def test_embed_errors(client, request_kwargs, status, field, text):
    response = client.post("/v1/embed", **request_kwargs)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["field"] == field
    assert text in error["message"]


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"vector": [0.0] * DIM}, "vector", "all zeros"),
        ({"vector": [1.0] * (DIM - 1)}, "vector", f"send a {DIM}-dimensional"),
        ({"vector": [1.0] * DIM, "k": 0}, "k", "greater than or equal to 1"),
        ({"vector": [1.0] * DIM, "k": 1001}, "k", "limit of 1000"),
        ({"vector": [1.0] * DIM, "k": "many"}, "k", "integer"),
        ({"k": 3}, None, "exactly one of"),
        ({"id": "a", "vector": [1.0] * DIM}, None, "exactly one of"),
        ({"id": "x" * 300}, "id", "limit of 256"),
        ({"vector": [1.0] * DIM, "nlist": 3}, "nlist", "not permitted"),
    ],
)
def test_search_json_errors(client, body, field, text):
    response = client.post("/v1/search", json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == field
    assert text in error["message"]


def test_search_errors(client: httpx.Client):
    response = client.post("/v1/search", json={"id": "ghost"})
    assert response.status_code == 404
    assert "'ghost'" in error_of(response)["message"]

    response = client.post(
        "/v1/search", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in error_of(response)["message"]

    response = client.post(
        "/v1/search", content=b"k=3", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415

    response = search_image(client, png(1), k=0)
    assert response.status_code == 422
    assert error_of(response)["field"] == "k"

    response = client.post("/v1/search", data={"k": "3"}, files={"other": ("a", b"x")})
    assert response.status_code == 422
    assert error_of(response)["field"] == "image"


@pytest.mark.parametrize(
    ("form", "field", "text"),
    [
        ({"id": "a", "metadata": "[1, 2]"}, "metadata", "not an object"),
        ({"id": "a", "metadata": "{oops"}, "metadata", "not valid JSON"),
        (
            {"id": "a", "metadata": json.dumps({"x": "y" * 17000})},
            "metadata",
            "limit of 16384",
        ),
        ({"metadata": "{}"}, "id", "field required"),
        ({"id": ""}, "id", "at least 1 character"),
        ({"id": "a/thumbnail"}, "id", "thumbnail"),
    ],
)
def test_add_item_form_errors(client, form, field, text):
    response = client.post(
        "/v1/items", data=form, files={"image": ("a.png", png(0), "image/png")}
    )
    assert response.status_code in (400, 422), response.text
    error = error_of(response)
    assert error["field"] == field
    assert text in error["message"]
    assert client.get("/v1/index").json()["size"] == 0


@pytest.mark.parametrize(
    ("payload", "field", "text"),
    [
        ({"items": [{"id": "a", "vector": [1.0] * 3}]}, "items.0.vector", "32"),
        ({"items": [{"id": "a", "vector": [0.0] * DIM}]}, "items.0.vector", "zeros"),
        (
            {"items": [{"id": "a", "vector": [1.0] * DIM, "metadata": [1]}]},
            "items.0.metadata",
            "object",
        ),
        ({"items": []}, "items", "at least 1"),
        (
            {"items": [{"id": "a", "vector": [1.0] * DIM}] * 2},
            "items",
            "more than once",
        ),
        (
            {"items": [{"id": f"{i}", "vector": [1.0] * DIM} for i in range(65)]},
            "items",
            "limit of 64",
        ),
        ({}, "items", "field required"),
    ],
)
def test_add_items_json_errors(client, payload, field, text):
    response = client.post("/v1/items", json=payload)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == field
    assert text in error["message"]
    assert client.get("/v1/index").json()["size"] == 0


def test_unknown_route_and_method(client: httpx.Client):
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert "no route" in error_of(response)["message"]
    assert client.put("/v1/embed").status_code == 405


def test_size_limits(server_factory):
    live = server_factory(
        max_image_bytes=2000,
        max_image_pixels=5000,
        max_images_per_request=2,
        max_request_bytes=500_000,
    )
    with live.client() as client:
        big_file = encode(random_image(0, size=(200, 200)), "BMP")
        response = client.post(
            "/v1/embed", files={"images": ("big.bmp", big_file, "image/bmp")}
        )
        assert response.status_code == 413
        assert "limit of 2000 bytes" in error_of(response)["message"]

        many_pixels = encode(random_image(0, size=(100, 100)).convert("L"), "PNG")
        assert len(many_pixels) < 2000
        response = client.post(
            "/v1/embed", files={"images": ("wide.png", many_pixels, "image/png")}
        )
        assert response.status_code == 413
        assert "limit of 5000" in error_of(response)["message"]

        small = png(1, size=(20, 20))
        files = [("images", (f"{i}.png", small, "image/png")) for i in range(3)]
        response = client.post("/v1/embed", files=files)
        assert response.status_code in (400, 422)
        assert "files" in error_of(response)["message"].lower()

        response = client.post(
            "/v1/search",
            content=b"x" * 600_000,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        assert "limit of 500000 bytes" in error_of(response)["message"]


def test_api_key_guards_writes(server_factory):
    live = server_factory(api_key="s3cret")
    with live.client() as client:
        response = add_image(client, "a", png(0))
        assert response.status_code == 401
        assert error_of(response)["field"] == "X-API-Key"
        assert (
            client.delete("/v1/items/a", headers={"X-API-Key": "wrong"}).status_code
            == 401
        )

        client.headers["X-API-Key"] = "s3cret"
        assert add_image(client, "a", png(0)).status_code == 201
        # Reads stay open.
        del client.headers["X-API-Key"]
        assert client.get("/v1/items/a").status_code == 200


def test_restart_keeps_items_and_snapshot(server_factory, tmp_path: Path):
    first = server_factory()
    with first.client() as client:
        for i in range(4):
            add_image(client, f"i{i}", png(i))
        client.delete("/v1/items/i1")
    first.stop()
    assert (tmp_path / "data" / "index.json").is_file()

    second = server_factory()
    with second.client() as client:
        index = client.get("/v1/index").json()
        assert index["size"] == 3
        assert index["snapshot_seq"] == 5
        results = search_image(client, png(2), k=10).json()["results"]
        assert results[0]["id"] == "i2"
        assert "i1" not in [r["id"] for r in results]


def test_broken_bundle_not_ready(server_factory, tmp_path: Path):
    live = server_factory(wait_ready=False, bundle_dir=tmp_path / "missing")
    with live.client() as client:
        for _ in range(200):
            if client.get("/healthz").status_code == 503:
                break
        assert client.get("/healthz").status_code == 503
        readyz = client.get("/readyz")
        assert readyz.status_code == 503
        assert readyz.json()["detail"] == "loading failed"
        response = client.post("/v1/search", json={"vector": [1.0] * DIM})
        assert response.status_code == 503
        assert error_of(response)["code"] == "not_ready"


def test_streamed_body_over_limit(server_factory):
    live = server_factory(max_request_bytes=100_000)

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    with live.client() as client:
        response = client.post(
            "/v1/search", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert error_of(response)["code"] == "request_too_large"


def test_concurrent_requests(client: httpx.Client, live_server: LiveServer):
    from concurrent.futures import ThreadPoolExecutor

    for i in range(5):
        add_image(client, f"base-{i}", png(i))

    def work(n: int) -> tuple[int, int]:
        with live_server.client() as own:
            added = add_image(own, f"new-{n}", png(100 + n)).status_code
            found = search_image(own, png(100 + n), k=3)
            assert found.json()["results"][0]["id"] == f"new-{n}"
            return added, found.status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(work, range(16)))
    assert statuses == [(201, 200)] * 16
    assert client.get("/v1/index").json()["size"] == 21
