"""deploy/compose.yaml: parses, and wires the demo bundle job to the API."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY_DIR, REPO_ROOT


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (DEPLOY_DIR / "compose.yaml").open() as stream:
        return yaml.safe_load(stream)


def test_compose_names_services_and_volumes(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"demo-bundle", "serve"}
    assert set(compose["volumes"]) == {"models", "data", "runs"}


def test_compose_build_targets(compose: dict[str, Any]) -> None:
    for service, target in [("demo-bundle", "train"), ("serve", "serve-cpu")]:
        build = compose["services"][service]["build"]
        assert build["target"] == target
        assert (DEPLOY_DIR / build["context"] / build["dockerfile"]).resolve() == (
            REPO_ROOT / "Dockerfile"
        )


def test_serve_waits_for_bundle(compose: dict[str, Any]) -> None:
    depends_on = compose["services"]["serve"]["depends_on"]
    assert depends_on == {
        "demo-bundle": {"condition": "service_completed_successfully"}
    }


def test_demo_bundle_trains_then_exports(compose: dict[str, Any]) -> None:
    demo = compose["services"]["demo-bundle"]
    (script,) = demo["command"]
    train_at = script.index("dcl train")
    export_at = script.index("dcl export")
    assert train_at < export_at
    assert "--out /models/current" in script[export_at:]
    assert "models:/models" in demo["volumes"]


def test_serve_volumes_and_settings(compose: dict[str, Any]) -> None:
    serve = compose["services"]["serve"]
    assert "models:/models:ro" in serve["volumes"]
    assert "data:/data" in serve["volumes"]
    assert serve["environment"]["DCL_BUNDLE_DIR"] == "/models/current"
    assert serve["environment"]["DCL_DATA_DIR"] == "/data"
    assert serve["read_only"] is True
    assert "/tmp" in serve["tmpfs"]
    assert serve["cap_drop"] == ["ALL"]
    assert serve["ports"] == ["127.0.0.1:8000:8000"]
