"""Batching, overload, API keys, limits, request ids, logs and metrics over HTTP.

Every test runs a real uvicorn server on 127.0.0.1 with the tiny ONNX bundle.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.encoder import CPU_PROVIDER, Encoder, choose_providers
from tests.service.conftest import DIM, LiveServer, encode, random_image


def png(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    return encode(random_image(seed, size=size))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Return one sample's value from Prometheus text output, or 0 if absent."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
    match = re.search(rf"^{pattern}$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height``, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def embed_one(live: LiveServer, seed: int) -> httpx.Response:
    with live.client() as client:
        return client.post(
            "/v1/embed", files={"images": ("a.png", png(seed), "image/png")}
        )


def test_concurrent_embeds_share_onnx_calls(server_factory):
    live = server_factory(max_batch_wait_ms=50, max_batch_size=64)
    requests = 24
    with ThreadPoolExecutor(max_workers=requests) as pool:
        responses = list(pool.map(lambda i: embed_one(live, i), range(requests)))
    assert [r.status_code for r in responses] == [200] * requests

    with live.client() as client:
        text = client.get("/metrics").text
    # Every image went through ONNX Runtime once, in fewer calls than requests.
    assert metric_value(text, "dcl_batch_size_sum") == requests
    calls = metric_value(text, "dcl_batch_size_count")
    assert 1 <= calls < requests


def test_full_queue_returns_429(server_factory):
    live = server_factory(max_queue_size=1, max_batch_size=1, max_batch_wait_ms=0)
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda i: embed_one(live, i), range(96)))
    statuses = [r.status_code for r in responses]

    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, "a queue of 1 under 32 concurrent clients rejected nothing"
    assert 200 in statuses
    assert rejected[0].headers["Retry-After"] == "1"
    assert "limit of 1 waiting requests" in error_of(rejected[0])["message"]
    with live.client() as client:
        text = client.get("/metrics").text
    assert metric_value(text, "dcl_batch_queue_rejections_total") == len(rejected)


def test_api_key_bearer_and_header(server_factory):
    live = server_factory(api_key="k3y-for-writes")
    files = {"image": ("a.png", png(0), "image/png")}
    with live.client() as client:
        response = client.post("/v1/items", data={"id": "a"}, files=files)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "no API key" in error_of(response)["message"]

        wrong = {"Authorization": "Bearer nope"}
        response = client.post(
            "/v1/items", data={"id": "a"}, files=files, headers=wrong
        )
        assert response.status_code == 401
        assert "wrong API key" in error_of(response)["message"]

        bearer = {"Authorization": "Bearer k3y-for-writes"}
        response = client.post(
            "/v1/items", data={"id": "a"}, files=files, headers=bearer
        )
        assert response.status_code == 201
        header = {"X-API-Key": "k3y-for-writes"}
        assert client.delete("/v1/items/a", headers=header).status_code == 200
        # Mode "writes" leaves reads open.
        assert client.get("/v1/index").status_code == 200


def test_auth_mode_all_guards_reads(server_factory):
    live = server_factory(api_key="read-key", auth_mode="all")
    with live.client() as client:
        for path in ("/v1/index", "/v1/model", "/v1/items/x"):
            response = client.get(path)
            assert response.status_code == 401, path
        assert (
            client.post("/v1/search", json={"vector": [1.0] * DIM}).status_code == 401
        )
        # Probes, metrics and the static demo page stay open.
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            assert client.get(path).status_code == 200, path

        client.headers["Authorization"] = "Bearer read-key"
        assert client.get("/v1/index").status_code == 200
        response = client.post("/v1/search", json={"vector": [1.0] * DIM})
        assert response.status_code == 200


def test_secrets_and_images_not_logged(server_factory, caplog):
    secret = "sup3r-secret-key-value"
    marker = b"IMAGE-BYTES-MARKER-5f1c"
    caplog.set_level(logging.DEBUG)
    live = server_factory(api_key=secret, auth_mode="all")
    with live.client() as client:
        client.headers["Authorization"] = f"Bearer {secret}"
        client.post("/v1/embed", files={"images": ("x.png", marker, "image/png")})
        client.post(
            "/v1/items",
            data={"id": "a"},
            files={"image": ("a.png", png(0), "image/png")},
            headers={"X-API-Key": secret},
        )
        client.get("/v1/index", headers={"Authorization": "Bearer wrong-" + secret})
    live.stop()

    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    # The test would pass vacuously if nothing was captured.
    assert "POST /v1/embed 400" in logged
    assert "GET /v1/index 401" in logged
    assert secret not in logged
    assert marker.decode() not in logged


def test_request_id_echoed_or_generated(client: httpx.Client, caplog):
    caplog.set_level(logging.INFO, logger="service.observability")
    response = client.get("/v1/index", headers={"X-Request-ID": "req-abc.123"})
    assert response.headers["X-Request-ID"] == "req-abc.123"

    generated = client.get("/v1/index").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # An id with characters outside [A-Za-z0-9._:-] is replaced.
    replaced = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert replaced.headers["X-Request-ID"] != "bad id with spaces"

    access = [r for r in caplog.records if getattr(r, "route", None) == "/v1/index"]
    assert len(access) == 2
    assert access[0].status == 200
    assert access[0].method == "GET"
    assert access[0].duration_ms >= 0


def test_decompression_bomb_rejected_by_header(client: httpx.Client):
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    response = client.post(
        "/v1/embed", files={"images": ("bomb.png", bomb, "image/png")}
    )
    assert response.status_code == 413
    assert "limit of 40000000" in error_of(response)["message"]


def test_metadata_depth_limit(server_factory):
    live = server_factory(max_metadata_depth=3)
    nested = {"a": {"b": {"c": {"d": 1}}}}
    with live.client() as client:
        response = client.post(
            "/v1/items",
            json={"items": [{"id": "a", "vector": [1.0] * DIM, "metadata": nested}]},
        )
        assert response.status_code == 422
        error = error_of(response)
        assert "4 levels deep" in error["message"]
        assert "limit of 3" in error["message"]
        assert error["field"] == "items.0.metadata"

        shallow = {"a": {"b": {"c": 1}}}
        response = client.post(
            "/v1/items",
            json={"items": [{"id": "a", "vector": [1.0] * DIM, "metadata": shallow}]},
        )
        assert response.status_code == 201


def test_metrics_cover_requests_stages_and_model(client: httpx.Client):
    client.post("/v1/embed", files={"images": ("a.png", png(0), "image/png")})
    client.post("/v1/search", json={"vector": [1.0] * DIM, "k": 3})
    client.get("/v1/items/missing")
    text = client.get("/metrics").text

    embed_ok = 'method="POST",route="/v1/embed",status="200"'
    assert metric_value(text, "dcl_http_requests_total", embed_ok) == 1
    missing = 'method="GET",route="/v1/items/{item_id:path}",status="404"'
    assert metric_value(text, "dcl_http_requests_total", missing) == 1
    assert "dcl_http_request_seconds_bucket" in text
    for stage in ("decode", "embed", "inference", "search"):
        assert metric_value(text, "dcl_stage_seconds_count", f'stage="{stage}"') >= 1
    assert metric_value(text, "dcl_index_vectors") == 0
    assert metric_value(text, "dcl_batch_queue_depth") == 0
    assert f'provider="{CPU_PROVIDER}"' in text
    assert "dcl_model_info{" in text


def test_choose_providers_choices():
    assert choose_providers("cpu") == [CPU_PROVIDER]
    assert choose_providers("auto")[-1] == CPU_PROVIDER
    with pytest.raises(ValueError, match="use one of auto, cpu, cuda, tensorrt"):
        choose_providers("gpu")


def test_cuda_request_on_cpu_build_logs_once(caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA, so there is no fallback")
    caplog.set_level(logging.WARNING, logger="service.encoder")
    assert choose_providers("cuda") == [CPU_PROVIDER]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "DCL_PROVIDERS=cuda" in warnings[0]


def test_encoder_intra_op_threads(bundle_dir: Path):
    encoder = Encoder(bundle_dir, providers=[CPU_PROVIDER], intra_op_threads=1)
    assert encoder.provider == CPU_PROVIDER
    images = np.zeros((2, 3, 32, 32), dtype=np.float32)
    assert encoder.embed(images).shape == (2, DIM)


def test_json_log_format(capfd):
    from service.observability import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("INFO", json_format=True)
        logging.getLogger("service.test").info(
            "hello %s", "world", extra={"route": "/v1/x", "status": 200}
        )
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    line = capfd.readouterr().err.strip().splitlines()[-1]
    entry = json.loads(line)
    assert entry["message"] == "hello world"
    assert entry["route"] == "/v1/x"
    assert entry["status"] == 200
    assert entry["request_id"] == "-"


@pytest.fixture
def client(live_server: LiveServer):
    with live_server.client() as c:
        yield c
