"""Search parameters and metadata filters over HTTP, JSON and multipart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.service.conftest import DIM, encode, random_image


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).normal(size=DIM)
    return (vector / np.linalg.norm(vector)).tolist()


def test_filter_and_params_json(server_factory):
    live = server_factory(index_kind="hnsw", hnsw_m=8)
    items = [
        {
            "id": f"i{n}",
            "vector": unit(n),
            "metadata": {"label": "cat" if n % 3 else "dog"},
        }
        for n in range(30)
    ]
    with live.client() as client:
        assert client.post("/v1/items", json={"items": items}).status_code == 201
        assert client.get("/v1/index").json()["kind"] == "hnsw"
        body = {"vector": unit(1), "k": 5, "filter": {"label": "dog"}, "ef_search": 64}
        response = client.post("/v1/search", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 5
        assert {r["metadata"]["label"] for r in results} == {"dog"}

        reranked = {"vector": unit(2), "k": 4, "rerank_factor": 8}
        response = client.post("/v1/search", json=reranked)
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 4

        by_id = {"id": "i3", "k": 3, "filter": {"label": "dog"}, "nprobe": 4}
        results = client.post("/v1/search", json=by_id).json()["results"]
        assert "i3" not in [r["id"] for r in results]
        assert len(results) == 3

        for bad, field in [
            ({"ef_search": 0}, "ef_search"),
            ({"nprobe": 10**6}, "nprobe"),
            ({"filter": {"label": ["a"]}}, "filter"),
            ({"filter": {}}, "filter"),
            ({"rerank_factor": 0}, "rerank_factor"),
            ({"rerank_factor": 65}, "rerank_factor"),
        ]:
            response = client.post("/v1/search", json={"vector": unit(1), **bad})
            assert response.status_code == 422, (bad, response.text)
            assert field in response.text


def test_filter_multipart(server_factory):
    live = server_factory()
    with live.client() as client:
        for n, label in enumerate(["red", "blue", "red"]):
            image = encode(random_image(n))
            response = client.post(
                "/v1/items",
                data={"id": f"img{n}", "metadata": json.dumps({"label": label})},
                files={"image": ("x.png", image)},
            )
            assert response.status_code == 201, response.text
        response = client.post(
            "/v1/search",
            data={"k": "5", "filter": '{"label": "red"}', "ef_search": "16"},
            files={"image": ("q.png", encode(random_image(1)))},
        )
        assert response.status_code == 200, response.text
        ids = sorted(r["id"] for r in response.json()["results"])
        assert ids == ["img0", "img2"]

        response = client.post(
            "/v1/search",
            data={"filter": "{not json"},
            files={"image": ("q.png", encode(random_image(1)))},
        )
        assert response.status_code == 422
        assert "filter" in response.text


def test_nan_metadata_and_empty_filter_key_rejected(server_factory):
    live = server_factory()
    with live.client() as client:
        good = {"id": "ok", "vector": unit(5), "metadata": {"label": "3"}}
        assert client.post("/v1/items", json={"items": [good]}).status_code == 201

        for raw in ('{"score": NaN}', '{"score": Infinity}', '{"score": 1e400}'):
            vector = json.dumps(unit(6))
            item = f'{{"id": "poison", "vector": {vector}, "metadata": {raw}}}'
            body = f'{{"items": [{item}]}}'
            response = client.post(
                "/v1/items",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 422, (raw, response.text)
            assert "NaN or Infinity" in response.text

        response = client.post(
            "/v1/items",
            data={"id": "poison", "metadata": '{"x": NaN}'},
            files={"image": ("a.png", encode(random_image(1)), "image/png")},
        )
        assert response.status_code == 422, response.text

        filtered = {"vector": unit(5), "k": 2, "filter": {"label": "3"}}
        response = client.post("/v1/search", json=filtered)
        assert response.status_code == 200, response.text
        assert [hit["id"] for hit in response.json()["results"]] == ["ok"]

        response = client.post("/v1/search", json={**filtered, "filter": {"": 1}})
        assert response.status_code == 422, response.text


def test_extreme_vector_magnitudes_normalised(server_factory):
    live = server_factory()
    with live.client() as client:
        items = [
            {"id": "huge", "vector": [1e308] * DIM, "metadata": {}},
            {"id": "tiny", "vector": [1e-200] * DIM, "metadata": {}},
        ]
        response = client.post("/v1/items", json={"items": items})
        assert response.status_code == 201, response.text

        response = client.post("/v1/search", json={"vector": [1.0] * DIM, "k": 2})
        scores = [hit["score"] for hit in response.json()["results"]]
        assert scores == pytest.approx([1.0, 1.0], abs=1e-5)
