"""Check the Kubernetes manifests, their kustomize references and rendered overlays.

kubernetes-validate checks every resource against the JSON schemas that it ships,
so these tests need no cluster and no network. Rendering the overlays needs
`kubectl kustomize` (or `kustomize build`); those tests skip when neither exists.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import K8S_DIR, find_tool

# The oldest Kubernetes release that the manifests are checked against, and the
# newest that kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
BASE_DIR = K8S_DIR / "base"
OVERLAYS = ("cpu", "gpu")

Resource = dict[str, Any]


def load_documents(path: Path) -> list[Resource]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def load_kustomization(folder: Path) -> Resource:
    path = folder / "kustomization.yaml"
    assert path.is_file(), f"{folder} has no kustomization.yaml"
    (document,) = load_documents(path)
    assert document["kind"] == "Kustomization"
    return document


def base_resources() -> list[Resource]:
    kustomization = load_kustomization(BASE_DIR)
    resources = []
    for name in kustomization["resources"]:
        resources.extend(load_documents(BASE_DIR / name))
    return resources


def resource_key(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def render(overlay: str) -> list[Resource]:
    """Render an overlay with kubectl kustomize or kustomize, or skip the test."""
    kubectl = find_tool("kubectl")
    kustomize = find_tool("kustomize")
    folder = str(K8S_DIR / "overlays" / overlay)
    if kubectl is not None:
        command = [kubectl, "kustomize", folder]
    elif kustomize is not None:
        command = [kustomize, "build", folder]
    else:
        pytest.skip("neither kubectl nor kustomize is installed to render overlays")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if resource_key(r) == (kind, name)]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(resource: Resource) -> Resource:
    return resource["spec"]["template"]["spec"]


def container(resource: Resource, name: str) -> Resource:
    containers = {c["name"]: c for c in pod_spec(resource)["containers"]}
    assert name in containers, f"no container {name}: {sorted(containers)}"
    return containers[name]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_base_resources_validate(version: str) -> None:
    resources = base_resources()
    assert resources
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_validator_rejects_unknown_field() -> None:
    # Guards the test above: strict validation must reject a misspelt field.
    deployment = copy.deepcopy(find(base_resources(), "Deployment", "dcl-serve"))
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_base_has_expected_resources() -> None:
    keys = {resource_key(resource) for resource in base_resources()}
    expected = {
        ("Deployment", "dcl-serve"),
        ("Service", "dcl-serve"),
        ("HorizontalPodAutoscaler", "dcl-serve"),
        ("PodDisruptionBudget", "dcl-serve"),
        ("ConfigMap", "dcl-settings"),
        ("Secret", "dcl-api-key"),
        ("PersistentVolumeClaim", "dcl-models"),
        ("PersistentVolumeClaim", "dcl-data"),
        ("PersistentVolumeClaim", "dcl-images"),
        ("Job", "dcl-index"),
    }
    assert expected <= keys, f"missing: {sorted(expected - keys)}"


def test_kustomization_files_exist() -> None:
    for folder in [BASE_DIR, *(K8S_DIR / "overlays" / o for o in OVERLAYS)]:
        kustomization = load_kustomization(folder)
        for name in kustomization.get("resources", []):
            assert (folder / name).exists(), f"{folder}: resource {name} is missing"
        for patch in kustomization.get("patches", []):
            assert (folder / patch["path"]).is_file(), f"{folder}: {patch} is missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_patches_target_base(overlay: str) -> None:
    folder = K8S_DIR / "overlays" / overlay
    kustomization = load_kustomization(folder)
    assert kustomization["resources"] == ["../../base"]
    base_keys = {resource_key(resource) for resource in base_resources()}
    for patch in kustomization.get("patches", []):
        for document in load_documents(folder / patch["path"]):
            assert resource_key(document) in base_keys, f"{patch} targets nothing"
            container_names = {
                c["name"]
                for r in base_resources()
                if resource_key(r) == resource_key(document)
                for c in pod_spec(r)["containers"]
            }
            for patched in pod_spec(document).get("containers", []):
                assert patched["name"] in container_names, f"{patch}: {patched}"


def test_deployment_probes_and_security() -> None:
    deployment = find(base_resources(), "Deployment", "dcl-serve")
    api = container(deployment, "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["resources"]["requests"]["cpu"]
    assert api["resources"]["limits"]["memory"]
    security = api["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod_spec(deployment)["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert "/data" in mounts
    assert "/tmp" in mounts


def test_single_writer_is_consistent() -> None:
    # The item store lives on a ReadWriteOnce volume that one replica writes.
    resources = base_resources()
    deployment = find(resources, "Deployment", "dcl-serve")
    hpa = find(resources, "HorizontalPodAutoscaler", "dcl-serve")
    data = find(resources, "PersistentVolumeClaim", "dcl-data")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert hpa["spec"]["maxReplicas"] == 1
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dcl-serve"
    assert data["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_settings_come_from_configmap_and_secret() -> None:
    resources = base_resources()
    settings = find(resources, "ConfigMap", "dcl-settings")["data"]
    assert settings["DCL_HOST"] == "0.0.0.0"
    assert settings["DCL_DATA_DIR"] == "/data"
    assert settings["DCL_BUNDLE_DIR"].startswith("/models")
    secret = find(resources, "Secret", "dcl-api-key")
    assert "DCL_API_KEY" in secret["stringData"]
    api = container(find(resources, "Deployment", "dcl-serve"), "api")
    assert api["envFrom"] == [{"configMapRef": {"name": "dcl-settings"}}]
    (key_env,) = [e for e in api["env"] if e["name"] == "DCL_API_KEY"]
    assert key_env["valueFrom"]["secretKeyRef"]["name"] == "dcl-api-key"


def test_index_job_is_suspended_and_writes_data() -> None:
    job = find(base_resources(), "Job", "dcl-index")
    assert job["spec"]["suspend"] is True
    index = container(job, "index")
    assert index["args"][0] == "index"
    assert index["args"][-1] == "/images"
    mounts = {m["mountPath"]: m for m in index["volumeMounts"]}
    assert mounts["/images"]["readOnly"] is True
    assert not mounts["/data"].get("readOnly", False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(overlay: str) -> None:
    resources = render(overlay)
    assert {resource_key(r) for r in resources} == {
        resource_key(r) for r in base_resources()
    }
    for resource in resources:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)


def test_cpu_overlay_uses_cpu_image() -> None:
    resources = render("cpu")
    for kind, name, container_name in [
        ("Deployment", "dcl-serve", "api"),
        ("Job", "dcl-index", "index"),
    ]:
        workload = find(resources, kind, name)
        assert container(workload, container_name)["image"].endswith(":serve-cpu")
        assert "nvidia.com/gpu" not in container(workload, container_name)[
            "resources"
        ].get("limits", {})


def test_gpu_overlay_requests_gpu() -> None:
    resources = render("gpu")
    for kind, name, container_name in [
        ("Deployment", "dcl-serve", "api"),
        ("Job", "dcl-index", "index"),
    ]:
        workload = find(resources, kind, name)
        gpu_container = container(workload, container_name)
        assert gpu_container["image"].endswith(":serve-gpu")
        assert gpu_container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # The patch adds to the base's CPU and memory figures, it does not drop them.
        assert gpu_container["resources"]["requests"]["cpu"]
        assert gpu_container["resources"]["limits"]["memory"]
        spec = pod_spec(workload)
        tolerations = {t["key"] for t in spec["tolerations"]}
        assert "nvidia.com/gpu" in tolerations
        assert spec["nodeSelector"]

    # The strategic merge keeps the base's probes on the patched API container.
    api = container(find(resources, "Deployment", "dcl-serve"), "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
