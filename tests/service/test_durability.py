"""Kill the real server with SIGKILL during a stream of writes, then check the data.

Every write acknowledged before the kill must be there after a restart, every
acknowledged deletion must stay deleted, and the one write in flight at the kill
is either fully applied (stored, with its metadata, and searchable by its
vector) or absent.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import DIM, _free_port

ROUNDS = 3
IDS = [f"item-{i}" for i in range(40)]


def item_vector(item_id: str, version: int) -> list[float]:
    rng = np.random.default_rng([int(item_id.split("-")[1]), version])
    vector = rng.normal(size=DIM)
    return (vector / np.linalg.norm(vector)).tolist()


@dataclass
class Ledger:
    """The client's record: acknowledged versions and the one write in flight.

    A version of None means absent. ``pending`` is (id, version after the write).
    """

    acked: dict[str, int | None] = field(default_factory=dict)
    pending: tuple[str, int | None] | None = None
    next_version: int = 1
    writes: int = 0


class ServerProcess:
    def __init__(
        self, bundle_dir: Path, data_dir: Path, log_path: Path, kind: str
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "DCL_INDEX_KIND": kind,
            "DCL_HNSW_M": "8",
            "DCL_MAX_TOMBSTONE_FRACTION": "0.3",
            "DCL_SNAPSHOT_EVERY_CHANGES": "15",
            "DCL_SNAPSHOT_EVERY_SECONDS": "0.5",
        }
        self.log = log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dcl_embed.cli",
                "serve",
                "--bundle",
                str(bundle_dir),
                "--data-dir",
                str(data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited; see {log_path}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server was not ready within 60 s; see {log_path}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            self.kill()


def write_until_killed(url: str, ledger: Ledger, rng: random.Random) -> None:
    """Send upserts and deletions one at a time until the connection fails."""
    with httpx.Client(base_url=url, timeout=10.0) as client:
        while True:
            item_id = rng.choice(IDS)
            present = ledger.acked.get(item_id) is not None
            try:
                if present and rng.random() < 0.3:
                    ledger.pending = (item_id, None)
                    response = client.delete(f"/v1/items/{item_id}")
                    if response.status_code != 200:
                        raise AssertionError(f"delete: {response.text}")
                else:
                    version = ledger.next_version
                    ledger.next_version += 1
                    ledger.pending = (item_id, version)
                    body = {
                        "items": [
                            {
                                "id": item_id,
                                "vector": item_vector(item_id, version),
                                "metadata": {"version": version},
                            }
                        ]
                    }
                    response = client.post("/v1/items", json=body)
                    if response.status_code != 201:
                        raise AssertionError(f"upsert: {response.text}")
            except httpx.TransportError:
                return
            ledger.acked[item_id] = ledger.pending[1]
            ledger.pending = None
            ledger.writes += 1


def observed_version(client: httpx.Client, item_id: str) -> int | None:
    """Return the stored version of an item, checking that search agrees."""
    response = client.get(f"/v1/items/{item_id}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    version = response.json()["metadata"]["version"]
    search = client.post(
        "/v1/search",
        json={"vector": item_vector(item_id, version), "k": 1, "ef_search": 64},
    )
    assert search.status_code == 200, search.text
    (top,) = search.json()["results"]
    assert top["id"] == item_id
    assert top["metadata"] == {"version": version}
    assert top["score"] > 0.999
    return version


def check_against_ledger(url: str, ledger: Ledger) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for item_id in IDS:
            version = observed_version(client, item_id)
            before = ledger.acked.get(item_id)
            allowed = {before}
            if ledger.pending is not None and ledger.pending[0] == item_id:
                allowed.add(ledger.pending[1])
            assert version in allowed, (
                f"{item_id} has version {version}, expected one of {allowed}"
            )
            ledger.acked[item_id] = version
        ledger.pending = None
        present = sum(v is not None for v in ledger.acked.values())
        index = client.get("/v1/index").json()
        assert index["size"] == present


@pytest.mark.parametrize("kind", ["hnsw", "exact"])
def test_sigkill_keeps_acknowledged_writes(bundle_dir: Path, tmp_path: Path, kind: str):
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    ledger = Ledger()
    rng = random.Random(1234)
    try:
        for _ in range(ROUNDS):
            server = ServerProcess(bundle_dir, data_dir, log_path, kind)
            try:
                check_against_ledger(server.url, ledger)
                writer = threading.Thread(
                    target=write_until_killed, args=(server.url, ledger, rng)
                )
                writer.start()
                time.sleep(rng.uniform(0.5, 2.0))
            finally:
                server.kill()
            writer.join(timeout=30)
            assert not writer.is_alive()

        server = ServerProcess(bundle_dir, data_dir, log_path, kind)
        try:
            check_against_ledger(server.url, ledger)
        finally:
            server.stop()
    except AssertionError:
        print(log_path.read_text()[-5000:])
        raise
    assert ledger.writes >= 3 * ROUNDS, "too few writes reached the server"
    assert any(v is None for v in ledger.acked.values()), "no deletion was checked"
