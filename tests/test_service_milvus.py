"""The service with CMH_INDEX_BACKEND=milvus: Milvus is the system of record, shared by replicas.

One real milvus-lite server process and two `cmh serve` replicas over real HTTP (B with
`--workers 2`: its workers share the collection too), through kill -9 of a replica and of the
server, and a hung (SIGSTOPped) server. Each replica
has its own copy of the demo artifacts folder: what they share is the collection, as two hosts
would; their job records (artifacts/jobs) stay their own, as a job is polled where it was
posted. Their images/ folders are not shared, so no test reads an item's image file through
the other replica (several hosts need that folder on a shared volume).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.local import free_port, service_process, serving
from common.errors import InputError
from service.app import create_app
from service.settings import Settings
from store.milvus_lite import MilvusLite

TIMEOUT_S = 3  # CMH_MILVUS_TIMEOUT_S of the replicas: how long a call waits for a dead server
COLORS = {"red": (220, 30, 30), "yellow": (240, 200, 40), "blue": (30, 60, 220)}


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


def items() -> list[dict[str, object]]:
    """Six items, two per color, with the color as a user field."""
    out: list[dict[str, object]] = []
    for n, (color, rgb) in enumerate(COLORS.items()):
        for j in range(2):
            out.append(
                {
                    "id": f"{color}-{j}" if j else 10 + n,
                    "text": f"a {color} sun" if j else f"a small {color} car",
                    "image_base64": base64.b64encode(png(rgb)).decode(),
                    "fields": {"color": color},
                }
            )
    return out


def build(client: httpx.Client, batch: list[dict[str, object]]) -> None:
    """POST a build and poll its job (on the replica that took it) until it succeeds."""
    accepted = client.post("/v1/index/build", json={"items": batch})
    assert accepted.status_code == 202, accepted.text
    job_url = accepted.json()["status_url"]
    for _ in range(600):
        status = client.get(job_url).json()
        if status["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert status["status"] == "succeeded", status


def text_hits(client: httpx.Client, **body: object) -> list[object]:
    found = client.post("/v1/search/text", json={"k": 20, **body})
    assert found.status_code == 200, found.text
    return [hit["id"] for hit in found.json()["hits"]]


def image_hits(client: httpx.Client, color: str, **form: str) -> list[object]:
    files = {"file": ("q.png", png(COLORS[color]), "image/png")}
    found = client.post("/v1/search/image", files=files, data={"k": "20", **form})
    assert found.status_code == 200, found.text
    return [hit["id"] for hit in found.json()["hits"]]


def test_two_replicas_share_one_collection_and_survive_kills(
    demo_artifacts: Path, milvus_lite: MilvusLite
) -> None:
    folder_b = Path(shutil.copytree(demo_artifacts, demo_artifacts.parent / "artifacts-b"))
    env = {
        "CMH_INDEX_BACKEND": "milvus",
        "CMH_MILVUS_URI": milvus_lite.uri,
        "CMH_MILVUS_COLLECTION": "cmh_replicas",
        "CMH_MILVUS_TIMEOUT_S": str(TIMEOUT_S),
    }
    everything = {"red-1", "yellow-1", "blue-1", 10, 11, 12}
    with (
        service_process(demo_artifacts, **env) as (proc_a, url_a),
        serving(folder_b, args=("--workers", "2"), ready_timeout_s=240, **env) as url_b,
        httpx.Client(base_url=url_b, timeout=60) as b,
    ):
        with httpx.Client(base_url=url_a, timeout=60) as a:
            assert a.get("/readyz").json()["index_size"] == 0  # the local demo store is not read
            build(a, items())
        # Built through A, searchable through B: text, image and a filtered search.
        assert set(text_hits(b, text="a red car", target="image")) == everything
        assert set(image_hits(b, "blue")) == everything
        red = {"filter": {"equals": {"color": "red"}}}
        assert set(text_hits(b, text="a red car", **red)) == {10, "red-1"}
        filtered = image_hits(b, "yellow", filter=json.dumps({"in": {"color": ["yellow"]}}))
        assert set(filtered) == {11, "yellow-1"}
        assert b.get("/v1/index/stats").json()["items"] == 6
        # A delete through B is gone from A.
        assert b.delete("/v1/items/blue-1").status_code == 200
        with httpx.Client(base_url=url_a, timeout=60) as a:
            assert "blue-1" not in text_hits(a, text="a blue sun")
            assert a.delete("/v1/items/blue-1").status_code == 404
        proc_a.send_signal(signal.SIGKILL)  # no clean shutdown of replica A
        proc_a.wait()
        everything.discard("blue-1")
        with serving(demo_artifacts, **env) as url_a, httpx.Client(base_url=url_a, timeout=60) as a:
            assert set(text_hits(a, text="a blue sun")) == everything  # nothing lost
            assert a.get("/readyz").json()["index_size"] == 5
            milvus_lite.kill()  # kill -9 of the server: both replicas say 503, promptly
            for client in (a, b):
                started = time.monotonic()
                down = client.post("/v1/search/text", json={"text": "a red car"})
                assert down.status_code == 503, down.text
                assert "Milvus" in down.json()["detail"], down.text
                ready = client.get("/readyz")
                assert ready.status_code == 503 and "Milvus" in ready.json()["detail"]
                assert time.monotonic() - started < 4 * TIMEOUT_S + 5
            milvus_lite.start()
            for client in (a, b):  # back: every acknowledged write is still there
                for _ in range(100):
                    if client.get("/readyz").status_code == 200:
                        break
                    time.sleep(0.2)
                assert set(text_hits(client, text="a red car")) == everything
            milvus_lite.pause()  # hung (SIGSTOP: sockets open, no answer): 503 in time too
            try:
                started = time.monotonic()
                hung = a.post("/v1/search/text", json={"text": "a red car"})
                assert hung.status_code == 503 and "Milvus" in hung.json()["detail"], hung.text
                assert a.get("/readyz").status_code == 503
                assert time.monotonic() - started < 4 * TIMEOUT_S + 5
            finally:
                milvus_lite.resume()
            for _ in range(100):
                if a.get("/readyz").status_code == 200:
                    break
                time.sleep(0.2)
            assert set(text_hits(a, text="a red car")) == everything


def test_milvus_backend_needs_a_uri(demo_artifacts_master: Path) -> None:
    with pytest.raises(InputError, match="CMH_MILVUS_URI"):
        with TestClient(
            create_app(Settings(artifacts_dir=demo_artifacts_master, index_backend="milvus"))
        ):
            pass


NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"


@contextmanager
def compose_proxy(folder: Path, upstreams: list[str]) -> Iterator[str]:
    """deploy/nginx.conf (the compose `scale-out` proxy) run by this machine's nginx, its two
    upstreams pointed at `upstreams` (host:port) and its port at a free loopback one."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).is_file()), None
    )
    if nginx is None:
        pytest.skip("nginx not installed: apt-get install nginx (the CI installs it)")
    port = free_port()
    conf = NGINX_CONF.read_text()
    for name, upstream in zip(("api-1:8000", "api-2:8000"), upstreams, strict=True):
        assert f"server {name} " in conf
        conf = conf.replace(f"server {name} ", f"server {upstream} ")
    assert "listen 8000;" in conf
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/tmp/", f"{folder}/")
    (folder / "nginx.conf").write_text(conf)
    argv = [nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                if httpx.get(f"{url}/proxy-healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def searches(url: str) -> float:
    """How many searches (text or image) the replica at url answered with 200 (its /metrics)."""
    lines = httpx.get(f"{url}/metrics", timeout=60).text.splitlines()
    wanted = ('route="/v1/search/', 'status="200"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("cmh_requests_total{") and all(w in line for w in wanted)
    )


def test_two_replicas_on_one_volume_behind_the_compose_proxy(
    demo_artifacts: Path, milvus_lite: MilvusLite, tmp_path: Path
) -> None:
    """The compose `scale-out` profile without Docker: two replicas on ONE artifacts folder (the
    shared volume) over one Milvus, behind deploy/nginx.conf. A build posted through the proxy
    is polled on either replica (the job file is shared), every replica sees the items, and when
    one replica dies the proxy keeps answering, searches included."""
    env = {
        "CMH_INDEX_BACKEND": "milvus",
        "CMH_MILVUS_URI": milvus_lite.uri,
        "CMH_MILVUS_COLLECTION": "cmh_proxy",
        "CMH_MILVUS_TIMEOUT_S": str(TIMEOUT_S),
    }
    proxy_dir = tmp_path / "nginx"
    proxy_dir.mkdir()
    with (
        service_process(demo_artifacts, **env) as (proc_a, url_a),
        serving(demo_artifacts, **env) as url_b,
    ):
        upstreams = [url.removeprefix("http://") for url in (url_a, url_b)]
        with compose_proxy(proxy_dir, upstreams) as url, httpx.Client(base_url=url) as proxy:
            accepted = proxy.post("/v1/index/build", json={"items": items()})
            assert accepted.status_code == 202, accepted.text
            status_url = accepted.json()["status_url"]
            assert status_url.startswith(url)  # the proxy's address (nginx passes Host on)
            job_url = httpx.URL(status_url).path
            for _ in range(600):  # polled on each replica directly: the job file is shared
                seen = [httpx.get(f"{u}{job_url}", timeout=60).json() for u in (url_a, url_b)]
                if all(s["status"] in ("succeeded", "failed") for s in seen):
                    break
                time.sleep(0.1)
            assert [s["status"] for s in seen] == ["succeeded", "succeeded"], seen
            everything = {"red-1", "yellow-1", "blue-1", 10, 11, 12}
            for _ in range(4):  # least_conn spreads sequential requests over both replicas
                assert set(text_hits(proxy, text="a red car")) == everything
                assert set(image_hits(proxy, "blue")) == everything
            for u in (url_a, url_b):
                assert httpx.get(f"{u}/v1/index/stats", timeout=60).json()["items"] == 6
                assert searches(u) > 0  # each replica answered some of the proxy's
            proc_a.send_signal(signal.SIGKILL)
            proc_a.wait()
            for _ in range(6):  # A refuses connections: nginx passes every request to B
                assert set(text_hits(proxy, text="a blue sun")) == everything
                assert proxy.get("/readyz").status_code == 200
