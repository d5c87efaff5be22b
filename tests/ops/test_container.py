"""The container files, checked without a Docker engine (none runs in CI): hadolint
on the Dockerfile, the compose spec on docker-compose.yml, and the properties the
image must have that a linter does not know about."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (it is in the dev extra)"
    return found


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _compose_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install x\nCMD recsvc serve\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    result = _compose_check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: up"))
    assert _compose_check(broken).returncode != 0


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _runtime_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    starts = [k for k, (word, _) in enumerate(ins) if word == "FROM"]
    return ins[starts[-1] :]  # the last stage is the default target


def test_image_runs_the_service_as_expected() -> None:
    ins = _instructions()
    arg = next(rest for word, rest in ins if word == "ARG" and rest.startswith("PYTHON_IMAGE="))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.fullmatch(rf"PYTHON_IMAGE=python:{re.escape(version)}-slim-\w+", arg)  # CI's Python
    runtime = _runtime_stage()
    words = dict(runtime)
    assert "AS runtime" in runtime[0][1]
    assert any("libgomp1" in r for w, r in runtime if w == "RUN")
    user = words["USER"]
    assert not user.startswith(("0", "root"))
    assert words["ENTRYPOINT"] == '["recsvc"]' and words["CMD"] == '["serve"]'  # exec form
    assert "/healthz" in words["HEALTHCHECK"] and "CMD [" in words["HEALTHCHECK"]
    # It listens on every interface, so it must not be made open by default: serve
    # refuses without API keys unless the operator sets RECSVC_INSECURE=1.
    env = " ".join(r for w, r in runtime if w == "ENV")
    assert "RECSVC_HOST=0.0.0.0" in env and "RECSVC_INSECURE" not in env


def test_compose_passes_the_keys_and_is_not_open_by_default() -> None:
    text = COMPOSE.read_text()
    assert "RECSVC_API_KEYS: ${RECSVC_API_KEYS:-}" in text
    assert "RECSVC_INSECURE: ${RECSVC_INSECURE:-0}" in text
    assert "RECSVC_LOADTEST_KEY: ${RECSVC_LOADTEST_KEY:-}" in text


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    ins = _instructions()
    starts = [k for k, (word, _) in enumerate(ins) if word == "FROM"]
    builder = ins[starts[0] : starts[1]]
    assert "AS builder" in builder[0][1]
    deps = next(k for k, (w, r) in enumerate(builder) if w == "RUN" and "--requirement" in r)
    source = next(k for k, (w, r) in enumerate(builder) if w == "COPY" and "recsvc" in r)
    copies_before = [r for w, r in builder[:deps] if w == "COPY"]
    assert deps < source and copies_before == ["pyproject.toml ./"]


@pytest.mark.parametrize(
    "source",
    [r.split()[0] for w, r in _instructions() if w == "COPY" and "--from" not in r],
)
def test_every_copied_path_exists_and_is_not_dockerignored(source: str) -> None:
    assert (ROOT / source).exists(), source
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    assert source.rstrip("/") in allowed, f"{source} is excluded from the build context"
