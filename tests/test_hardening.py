"""Hostile clients against a real `python -m cli serve` process (issue 15): bodies without a
Content-Length, strings Python can hold but UTF-8 cannot, invented methods, unauthenticated
garbage, dataset records naming files outside the data folder, and what the schema promises."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from bench.local import serving
from tests.helpers import wait_for_job

KEY = "k3y"
MAX_BODY = 100_000


def png_b64(colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def evil_dataset(data_dir: Path, demo: Path, outside: Path) -> None:
    """A demo layout in data_dir/evil: two good records, two naming files outside data_dir."""
    root = data_dir / "evil"
    (root / "images").mkdir(parents=True)
    shutil.copy(demo / "labels.txt", root / "labels.txt")
    records = []
    for i, name in enumerate(("00001.jpg", "00002.jpg")):
        shutil.copy(demo / "images" / name, root / "images" / name)
        records.append({"id": 90_000 + i, "image": f"images/{name}"})
    records.append({"id": 90_010, "image": str(outside)})  # an absolute path
    records.append({"id": 90_011, "image": "../../outside.png"})  # climbs out of data_dir
    with (root / "captions.jsonl").open("w") as f:
        for rec in records:
            line = {**rec, "caption": "a red car", "labels": ["car"], "split": "database"}
            f.write(json.dumps(line) + "\n")


@pytest.fixture(scope="module")
def server(demo_artifacts_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One served copy of the demo artifacts for this module: a key, a small body limit, a data
    folder holding a dataset whose records try to leave it."""
    base = tmp_path_factory.mktemp("hardening")
    artifacts = Path(shutil.copytree(demo_artifacts_master, base / "artifacts"))
    data_dir = base / "data"
    outside = base / "outside.png"
    outside.write_bytes(base64.b64decode(png_b64((1, 2, 3))))
    evil_dataset(data_dir, artifacts / "demo", outside)
    with serving(
        artifacts,
        CMH_API_KEY=KEY,
        CMH_MAX_BODY_BYTES=str(MAX_BODY),
        CMH_SERVER_DATA_DIR=str(data_dir),
    ) as url:
        yield url


def request(
    url: str, method: str, path: str, body: str | bytes | None = None, **headers: str
) -> tuple[int, bytes, http.client.HTTPMessage]:
    """One raw request (any method name, any bytes) on a fresh connection."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read(), response.headers
    finally:
        conn.close()


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes or a whole Content-Length body has come."""
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no whole response in time; got {data[:200]!r}") from None
        if not piece:
            return data
        data += piece
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and len(body) >= int(value):
                    return data


def stream_unfinished(
    url: str, path: str, n_bytes: int, *, headers: str = "", prefix: bytes = b""
) -> bytes:
    """POST prefix and n_bytes more as a chunked body that never ends; the server's answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=15) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nTransfer-Encoding: chunked\r\n"
            f"{headers}\r\n"
        )
        sock.sendall(head.encode())
        if prefix:
            sock.sendall(b"%x\r\n%s\r\n" % (len(prefix), prefix))
        chunk = b"x" * 8192
        sent = 0
        try:
            while sent < n_bytes:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending
        return read_response(sock)


JSON = "Content-Type: application/json\r\n"
MULTIPART_HEAD = (
    b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


@pytest.mark.parametrize(
    ("path", "headers", "prefix"),
    [
        ("/v1/search/text", JSON, b'{"text": "'),
        ("/v1/index/build", f"{JSON}X-API-Key: {KEY}\r\n", b'{"items": [{"text": "'),
        ("/v1/search/image", "Content-Type: multipart/form-data; boundary=xyz\r\n", MULTIPART_HEAD),
    ],
)
def test_a_chunked_body_is_limited_while_it_streams(
    server: str, path: str, headers: str, prefix: bytes
) -> None:
    # The body never ends: a server that waited for all of it (as before) would never answer.
    answer = stream_unfinished(server, path, 3 * MAX_BODY, headers=headers, prefix=prefix)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer[:300]
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body == {
        "detail": f"expected a body of at most {MAX_BODY} bytes, got more (chunked)",
        "errors": [],
    }
    assert b"connection: close" in rest.lower()  # the rest of the body is never read


def test_the_server_stays_healthy_after_large_chunked_bodies(server: str) -> None:
    for _ in range(3):
        stream_unfinished(server, "/v1/search/text", 20 * 2**20, headers=JSON)
    assert request(server, "GET", "/healthz")[0] == 200
    status, body, _ = request(server, "POST", "/v1/search/text", json.dumps({"text": "car"}))
    assert status == 200 and len(json.loads(body)["hits"]) == 10


def test_a_declared_length_past_the_limit_is_refused_before_reading(server: str) -> None:
    status, body, _ = request(
        server, "POST", "/v1/search/text", b"{}", **{"Content-Length": str(MAX_BODY + 1)}
    )
    assert status == 413
    assert json.loads(body)["detail"] == (
        f"expected a body of at most {MAX_BODY} bytes, got {MAX_BODY + 1}"
    )


@pytest.mark.parametrize(
    "raw",
    [
        '{"text": "\\ud800", "k": 1}',  # a lone surrogate: Python holds it, UTF-8 cannot
        '{"text": "\\udfff\\ud800", "k": 0}',
        '{"text": "car", "k": 1, "target": "\\ud800"}',
    ],
)
def test_lone_surrogates_get_a_422_that_can_be_encoded(server: str, raw: str) -> None:
    path = "/v1/index/build" if "items" in raw else "/v1/search/text"
    status, body, _ = request(server, "POST", path, raw, **{"X-API-Key": KEY})
    assert status == 422, body[:300]
    errors = json.loads(body)["detail"]
    assert errors and all({"loc", "msg", "type"} <= set(e) for e in errors)
    assert "\\ud800" in body.decode("utf-8")  # shown escaped, not dropped


def test_a_build_items_lone_surrogate_id_is_a_400_that_can_be_encoded(server: str) -> None:
    raw = '{"items": [{"id": "\\ud800", "text": "x", "image_base64": "AA=="}]}'
    status, body, _ = request(server, "POST", "/v1/index/build", raw, **{"X-API-Key": KEY})
    assert status == 400, body[:300]
    (error,) = json.loads(body)["errors"]
    assert error["id"] == "\\ud800"  # shown escaped, not dropped
    assert error["reason"].startswith("expected a string id of valid Unicode")


def test_surrogates_in_fields_and_nul_in_texts_are_refused_before_a_202(server: str) -> None:
    items = [
        {"id": 91000, "text": "x", "image_base64": png_b64(), "fields": {"a": "SURROGATE"}},
        {"id": 91001, "text": "a\u0000b", "image_base64": png_b64()},
    ]
    raw = json.dumps({"items": items}).replace("SURROGATE", "\\ud800")
    status, body, _ = request(server, "POST", "/v1/index/build", raw, **{"X-API-Key": KEY})
    assert status == 400, body[:500]
    reasons = {e["index"]: e["reason"] for e in json.loads(body)["errors"]}
    assert "lone surrogate" in reasons[0] and "NUL" in reasons[1]


def test_validation_errors_do_not_echo_megabytes(server: str) -> None:
    text = "x" * 60_000
    status, body, _ = request(server, "POST", "/v1/search/text", json.dumps({"text": text}))
    assert status == 422 and len(body) < 2000, len(body)
    (error,) = json.loads(body)["detail"]
    assert error["loc"] == ["body", "text"] and error["type"] == "string_too_long"
    assert error["input"] == "x" * 200 + "…"
    status, body, _ = request(
        server, "POST", "/v1/search/text", json.dumps({"text": "a", "k": list(range(10_000))})
    )
    assert status == 422 and len(body) < 2000, len(body)


# Methods a client may send that the app does not route: uvicorn's httptools parser passes
# these (WebDAV and others) to the app; a name it does not know it refuses itself with 400.
OTHER_METHODS = ("PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PURGE", "REPORT", "LINK")


def test_invented_methods_and_paths_share_one_metrics_bucket(server: str) -> None:
    assert request(server, "BREW", "/healthz")[0] in (400, 405)
    assert request(server, "GET", "/no/such/path")[0] == 404

    def label_lines() -> set[str]:
        text = request(server, "GET", "/metrics")[1].decode()
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("cmh_")}

    assert request(server, OTHER_METHODS[0], "/healthz")[0] == 405
    label_lines()  # so that /metrics itself has its labels before the count
    before = label_lines()
    for i in range(500):
        assert request(server, OTHER_METHODS[i % len(OTHER_METHODS)], "/healthz")[0] == 405
        assert request(server, f"BREW{i}", "/healthz")[0] in (400, 405)  # h11 passes these on
        assert request(server, "GET", f"/no/such/path/{i}")[0] == 404
    after = label_lines()
    assert after == before
    assert 'cmh_requests_total{method="other",route="/healthz",status="405"}' in after
    assert 'cmh_requests_total{method="GET",route="unmatched",status="404"}' in after


def test_405_says_which_methods_are_allowed(server: str) -> None:
    status, _, headers = request(server, "PUT", "/healthz")
    assert status == 405 and set(headers["Allow"].split(", ")) <= {"GET", "HEAD"}
    assert "GET" in headers["Allow"]
    status, _, headers = request(server, "GET", "/v1/index/build")
    assert status == 405 and headers["Allow"] == "POST"
    # "0/image" is also a string id the delete route would take: the image route answers.
    status, _, headers = request(server, "OPTIONS", "/v1/items/0/image")
    assert status == 405 and headers["Allow"] == "GET"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/index/build", "{not json"),
        ("POST", "/v1/index/build", '{"items": "wrong"}'),
        ("DELETE", "/v1/items/1", "{not json"),
    ],
)
def test_the_key_is_checked_before_the_body(server: str, method: str, path: str, body: str) -> None:
    status, answer, _ = request(server, method, path, body)
    assert status == 401, answer[:300]
    assert json.loads(answer)["detail"] == "expected a valid X-API-Key header for this endpoint"
    status, _, _ = request(server, method, path, body, **{"X-API-Key": "wrong"})
    assert status == 401
    if path == "/v1/index/build":  # with the key, the body is read and refused
        assert request(server, method, path, body, **{"X-API-Key": KEY})[0] == 422


@pytest.mark.parametrize(
    "item",
    [
        {"image_path": "a" * 300 + ".png"},  # a name the OS refuses (ENAMETOOLONG)
        {"image_path": "a/" * 3000 + "b.png"},  # a path the OS refuses
        {"image_path": "x\u0000.png"},
    ],
)
def test_paths_the_os_rejects_are_a_400(server: str, item: dict[str, str]) -> None:
    body = json.dumps({"items": [{"id": 92000, "text": "x", **item}]})
    status, answer, _ = request(server, "POST", "/v1/index/build", body, **{"X-API-Key": KEY})
    assert status == 400, answer[:300]
    assert "inside the server data folder" in json.loads(answer)["errors"][0]["reason"]


@pytest.mark.parametrize("root", ["a" * 300, "x\u0000y", "../..", "no-such-root"])
def test_a_bad_dataset_root_is_a_400_before_any_job(server: str, root: str) -> None:
    body = json.dumps({"dataset": {"name": "demo", "root": root}})
    status, answer, _ = request(server, "POST", "/v1/index/build", body, **{"X-API-Key": KEY})
    assert status == 400, answer[:300]
    assert "root" in json.loads(answer)["detail"]


def test_decode_errors_do_not_print_object_addresses(server: str) -> None:
    plain = base64.b64encode(b"plain text, not an image").decode()
    body = json.dumps({"items": [{"id": 93000, "text": "x", "image_base64": plain}]})
    status, answer, _ = request(server, "POST", "/v1/index/build", body, **{"X-API-Key": KEY})
    assert status == 400
    reason = json.loads(answer)["errors"][0]["reason"]
    assert reason.startswith("could not decode image") and " at 0x" not in reason, reason


def test_dataset_files_outside_the_data_folder_are_skipped_never_served(server: str) -> None:
    with httpx.Client(base_url=server, timeout=60, headers={"X-API-Key": KEY}) as client:
        accepted = client.post(
            "/v1/index/build", json={"dataset": {"name": "demo", "root": "evil"}}
        )
        assert accepted.status_code == 202, accepted.text
        status = wait_for_job(client, accepted.json()["job_id"])
        assert status["status"] == "succeeded" and status["added"] == 2, status
        skipped = status["skipped"]
        assert isinstance(skipped, list) and len(skipped) == 2
        assert all("inside the server data folder" in s for s in skipped), skipped
        assert {s.split(":")[0] for s in skipped} == {"90010", "90011"}
        assert client.get("/v1/items/90000/image").status_code == 200
        for escaped in (90010, 90011):
            assert client.get(f"/v1/items/{escaped}/image").status_code == 404


def test_the_schema_says_what_the_server_enforces(server: str) -> None:
    schema = json.loads(request(server, "GET", "/openapi.json")[1])
    components = schema["components"]["schemas"]
    assert components["TextSearch"]["properties"]["k"]["maximum"] == 100
    build = components["BuildRequest"]
    assert [rule["required"] for rule in build["oneOf"]] == [["items"], ["dataset"]]
    image_search = schema["paths"]["/v1/search/image"]["post"]["requestBody"]["content"]
    form = image_search["multipart/form-data"]
    assert form["encoding"]["file"]["contentType"] == "image/*"
    form_schema = components[form["schema"]["$ref"].rsplit("/", 1)[1]]
    assert form_schema["properties"]["k"]["maximum"] == 100
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    image = schema["paths"]["/v1/items/{item_id}/image"]["get"]["responses"]["200"]["content"]
    assert list(image) == ["image/*"]
    build_op = schema["paths"]["/v1/index/build"]["post"]
    assert "429" in build_op["responses"] and build_op["security"] == [{"APIKeyHeader": []}]


def test_the_batch_and_fields_limits_are_400s_saying_so(server: str) -> None:
    items = [{"id": i, "text": "x", "image_base64": "AA=="} for i in range(1001)]
    status, body, _ = request(
        server, "POST", "/v1/index/build", json.dumps({"items": items}), **{"X-API-Key": KEY}
    )
    assert status == 400 and json.loads(body)["detail"] == "expected at most 1000 items, got 1001"
    item = {"id": 94000, "text": "x", "image_base64": png_b64(), "fields": {"a": "y" * 17_000}}
    status, body, _ = request(
        server, "POST", "/v1/index/build", json.dumps({"items": [item]}), **{"X-API-Key": KEY}
    )
    assert status == 400, body[:300]
    reason = json.loads(body)["errors"][0]["reason"]
    assert reason.startswith(
        "expected the item's fields to take at most 16384 bytes as JSON, got 170"
    )
