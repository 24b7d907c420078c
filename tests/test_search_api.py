"""The search API's fields of issue 32 through TestClient over the demo (lifespan runs):
scoring (asymmetric against brute force over the stored codes), offset, max_distance, the batch
search, the words a query used and ignored, suggested words, and each refusal's message; then
the same fields through a real `cmh serve` process."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.local import serving
from cli.main import main as cli_main
from indexes.asymmetric import Asymmetric
from indexes.codes import unpack_codes
from service.app import create_app
from service.schemas import MAX_BATCH_QUERIES, MAX_RANK
from service.settings import Settings
from store import metadata as md
from store.milvus_lite import MilvusLite
from store.store import DB_NAME, STORE_DIR, Store

QUERY = "a red car on green grass"


@pytest.fixture(scope="module")
def artifacts(demo_artifacts_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo artifacts that this module's searches read (none writes)."""
    copy = tmp_path_factory.mktemp("search-api") / "artifacts"
    shutil.copytree(demo_artifacts_master, copy)
    return copy


@pytest.fixture(scope="module")
def client(artifacts: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(artifacts_dir=artifacts, max_k=500))) as made:
        yield made


def text_search(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/search/text", json={"text": QUERY, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def ids(result: dict[str, Any]) -> list[Any]:
    return [hit["id"] for hit in result["hits"]]


def stored(client: TestClient) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """(ids, image codes, text codes) of every live item in insertion order, read from the
    store's own parts and database (not through a search)."""
    store = client.app.state.serving.current().store  # type: ignore[attr-defined]
    assert isinstance(store, Store)
    seqs, image, text = store.live_rows()
    path = store.artifacts / STORE_DIR / DB_NAME
    with closing(md.connect(path)) as conn:
        rows = md.rows_by_seq(conn, seqs.tolist(), path)
    return [rows[s].id for s in seqs.tolist()], image, text


def brute_force_asymmetric(client: TestClient, text: str, codes: np.ndarray) -> list[int]:
    """Positions of the stored codes by weighted distance to the query's real output (the
    sum of |q_j| over differing bits, rounded as indexes/asymmetric.py defines), ties in
    insertion order."""
    encoder = client.app.state.serving.current().encoder  # type: ignore[attr-defined]
    encoded = encoder.encode_query(encoder.read_query(text), real=True)
    asym = Asymmetric.of(encoded.code, encoded.real)
    differs = unpack_codes(codes, encoder.n_bits) != unpack_codes(encoded.code, encoder.n_bits)
    wd = (differs * asym.weights[0]).sum(axis=1)
    return np.lexsort((np.arange(len(wd)), wd)).tolist()  # type: ignore[no-any-return]


def test_asymmetric_is_the_default_and_equals_brute_force(client: TestClient) -> None:
    item_ids, image, text = stored(client)
    n = len(item_ids)
    for target, codes in (("image", image), ("text", text)):
        result = text_search(client, k=n, target=target)
        assert result["scoring"] == "asymmetric"
        want = [item_ids[p] for p in brute_force_asymmetric(client, QUERY, codes)]
        assert ids(result) == want, target
        scores = [hit["score"] for hit in result["hits"]]
        assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1


def test_hamming_scoring_ranks_by_distance_and_scores_it(client: TestClient) -> None:
    result = text_search(client, k=40, scoring="hamming")
    dists = [hit["distance"] for hit in result["hits"]]
    assert result["scoring"] == "hamming" and dists == sorted(dists)
    n_bits = result["n_bits"]
    assert [hit["score"] for hit in result["hits"]] == [1 - 2 * d / n_bits for d in dists]
    assert ids(result) != ids(text_search(client, k=40))  # the two scorings differ here


@pytest.mark.parametrize("scoring", ["hamming", "asymmetric"])
def test_offset_pages_through_the_same_ranking(client: TestClient, scoring: str) -> None:
    whole = ids(text_search(client, k=40, scoring=scoring))
    for offset in (0, 1, 7, 25, 29):
        page = text_search(client, k=5, offset=offset, scoring=scoring)
        assert page["offset"] == offset and ids(page) == whole[offset : offset + 5]
    past = text_search(client, k=5, offset=len(stored(client)[0]), scoring=scoring)
    assert past["hits"] == []


@pytest.mark.parametrize("scoring", ["hamming", "asymmetric"])
def test_max_distance_keeps_the_best_within_it(client: TestClient, scoring: str) -> None:
    everything = text_search(client, k=500, scoring=scoring)["hits"]
    radius = sorted(hit["distance"] for hit in everything)[len(everything) // 3]
    within = [hit["id"] for hit in everything if hit["distance"] <= radius]
    for k in (3, len(within), len(within) + 10):
        got = text_search(client, k=k, scoring=scoring, max_distance=radius)
        assert ids(got) == within[:k], (k, radius)
        assert all(hit["distance"] <= radius for hit in got["hits"])
    paged = text_search(client, k=4, offset=2, scoring=scoring, max_distance=radius)
    assert ids(paged) == within[2:6]


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_image_search_takes_scoring_offset_and_max_distance(client: TestClient) -> None:
    def search(**form: Any) -> dict[str, Any]:
        data = {key: str(value) for key, value in form.items()}
        response = client.post(
            "/v1/search/image",
            files={"file": ("q.png", png((200, 30, 30)), "image/png")},
            data=data,
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    for scoring in ("hamming", "asymmetric"):
        whole = search(k=20, scoring=scoring)
        assert whole["scoring"] == scoring
        assert ids(search(k=6, offset=9, scoring=scoring)) == ids(whole)[9:15]
        radius = whole["hits"][10]["distance"]
        near = search(k=20, scoring=scoring, max_distance=radius)
        assert all(hit["distance"] <= radius for hit in near["hits"])
    hamming = search(k=20, scoring="hamming")["hits"]
    assert [h["distance"] for h in hamming] == sorted(h["distance"] for h in hamming)
    scores = [h["score"] for h in search(k=20)["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_words_used_and_ignored_and_no_known_words(client: TestClient) -> None:
    result = text_search(client, text="the RED Cars", k=3)
    assert result["used_words"] == ["red", "car"] and result["unknown_words"] == ["the"]
    assert result["no_known_words"] is False and len(result["hits"]) == 3
    none = text_search(client, text="zebra xylophone", k=5)
    assert none["no_known_words"] is True and none["hits"] == []
    assert none["unknown_words"] == ["zebra", "xylophone"] and none["used_words"] == []
    assert "“zebra”" in none["message"] and "“xylophone”" in none["message"]
    symbols = text_search(client, text="?!", k=5)
    assert symbols["no_known_words"] is True and symbols["hits"] == []
    assert "no words" in symbols["message"]


def test_a_batch_answers_each_query_as_its_single_search(client: TestClient) -> None:
    queries = [
        {"text": QUERY, "k": 5},
        {"text": QUERY, "k": 4, "offset": 3, "scoring": "hamming", "target": "text"},
        {"text": "a boat by the sea", "k": 6, "max_distance": 30},
        {"text": "a balloon", "k": 3, "filter": {"ids": [1, 2, 3, 4, 5, 6]}},
        {"text": "zebra", "k": 2},
    ]
    response = client.post("/v1/search/text/batch", json={"queries": queries})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(queries)
    for query, result in zip(queries, results, strict=True):
        assert result == text_search(client, **query)


def test_bad_fields_are_refused_naming_the_field_and_the_limit(client: TestClient) -> None:
    def refused(body: dict[str, Any], status: int, *expected: str) -> None:
        response = client.post("/v1/search/text", json={"text": QUERY, **body})
        assert response.status_code == status, response.text
        text = json.dumps(response.json()["detail"])
        for part in expected:
            assert part in text, (part, text)

    # max_k is 500 here: offset goes up to 9,500, so that offset + k <= 10,000.
    refused({"k": 10, "offset": MAX_RANK - 499}, 400, "expected offset in 0..9500", "got 9501")
    refused({"offset": MAX_RANK}, 422, "offset", str(MAX_RANK - 1))
    refused({"offset": -1}, 422, "offset", "greater than or equal to 0")
    refused({"offset": True}, 422, "offset", "expected an integer, got a boolean")
    refused({"max_distance": "3"}, 422, "max_distance", "expected an integer, got a string")
    assert text_search(client, k=2, offset=1.0)["offset"] == 1  # JSON's 1.0 is the integer 1
    refused({"scoring": "cosine"}, 422, "scoring", "hamming", "asymmetric")
    refused({"max_distance": -3}, 422, "max_distance")
    refused({"k": 501}, 400, "expected k in 1..500, got 501")
    too_many = {"queries": [{"text": "a"}] * (MAX_BATCH_QUERIES + 1)}
    response = client.post("/v1/search/text/batch", json=too_many)
    assert response.status_code == 422
    assert "queries" in response.text and str(MAX_BATCH_QUERIES) in response.text
    assert client.post("/v1/search/text/batch", json={"queries": []}).status_code == 422
    deep = {"queries": [{"text": "a"}, {"text": "a", "k": 10, "offset": MAX_RANK - 1}]}
    response = client.post("/v1/search/text/batch", json=deep)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("queries[1]: expected offset in 0..9500")
    image = client.post(
        "/v1/search/image",
        files={"file": ("q.png", png((0, 0, 200)), "image/png")},
        data={"k": "10", "offset": str(MAX_RANK - 1)},
    )
    assert image.status_code == 400 and f"offset + k <= {MAX_RANK}" in image.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]["TextSearch"]
    assert schema["properties"]["offset"]["maximum"] == MAX_RANK - 500  # the server's bound
    assert f"offset + k <= {MAX_RANK}" in schema["properties"]["offset"]["description"]


def test_suggested_words_come_from_the_model_and_the_collection(client: TestClient) -> None:
    response = client.get("/v1/search/words", params={"n": 6})
    assert response.status_code == 200
    words = response.json()["words"]
    vocabulary = client.app.state.serving.current().encoder.vectorizer.vocabulary  # type: ignore[attr-defined]
    assert 1 <= len(words) <= 6 and set(words) <= set(vocabulary)
    texts = [t.lower() for t in client.app.state.serving.current().store.sample_texts(10_000)]  # type: ignore[attr-defined]
    assert all(sum(w in t.split() for t in texts) >= 2 for w in words)  # each in 2+ items
    assert client.get("/v1/search/words", params={"n": 0}).status_code == 422
    for word in words[:2]:  # each one finds hits
        assert text_search(client, text=word, k=1)["hits"]


def test_the_fields_through_a_real_server(demo_artifacts: Path) -> None:
    """The same requests through a real uvicorn process: JSON and form fields on the wire."""
    with serving(demo_artifacts) as url, httpx.Client(base_url=url, timeout=60) as http:
        page = http.post("/v1/search/text", json={"text": QUERY, "k": 4, "offset": 2}).json()
        whole = http.post("/v1/search/text", json={"text": QUERY, "k": 6}).json()
        assert [h["id"] for h in page["hits"]] == [h["id"] for h in whole["hits"]][2:6]
        batch = http.post(
            "/v1/search/text/batch",
            json={"queries": [{"text": QUERY, "k": 6}, {"text": "zebra"}]},
        ).json()["results"]
        assert batch[0] == whole and batch[1]["no_known_words"] is True
        refused = http.post("/v1/search/text", json={"text": QUERY, "scoring": "best"})
        assert refused.status_code == 422 and "scoring" in refused.text
        image = http.post(
            "/v1/search/image",
            files={"file": ("q.png", png((20, 200, 20)), "image/png")},
            data={"k": "3", "scoring": "hamming", "offset": "1", "max_distance": "64"},
        )
        assert image.status_code == 200 and image.json()["scoring"] == "hamming"
        assert len(image.json()["hits"]) == 3
        assert http.get("/readyz").status_code == 200


def test_the_milvus_backend_answers_every_field_as_the_local_store(
    demo_artifacts: Path, milvus_lite: MilvusLite
) -> None:
    """The demo's store copied into milvus-lite (`cmh index migrate --to milvus`): every field
    of issue 32, with and without a filter, gives the local store's answer (ids, distances and
    scores), which the tests above hold against brute force."""
    argv = ["index", "migrate", "--artifacts", str(demo_artifacts), "--to", "milvus"]
    assert cli_main([*argv, "--uri", milvus_lite.uri, "--collection", "cmh_api"]) == 0
    milvus = Settings(
        artifacts_dir=demo_artifacts,
        index_backend="milvus",
        milvus_uri=milvus_lite.uri,
        milvus_collection="cmh_api",
        max_k=500,
    )
    local = Settings(artifacts_dir=demo_artifacts, max_k=500)
    bodies: list[dict[str, Any]] = [
        {"text": QUERY, "k": 80},
        {"text": QUERY, "k": 80, "scoring": "hamming", "target": "text"},
        {"text": QUERY, "k": 5, "offset": 11},
        {"text": "a boat by the sea", "k": 30, "max_distance": 26},
        {"text": "a boat by the sea", "k": 7, "max_distance": 26, "scoring": "hamming"},
        {"text": QUERY, "k": 9, "filter": {"ids": list(range(40))}},
    ]
    answers = []
    for settings in (local, milvus):
        with TestClient(create_app(settings)) as client:
            single = [client.post("/v1/search/text", json=b).json() for b in bodies]
            batch = client.post("/v1/search/text/batch", json={"queries": bodies}).json()
            image = client.post(
                "/v1/search/image",
                files={"file": ("q.png", png((200, 30, 30)), "image/png")},
                data={"k": "25", "offset": "3"},
            ).json()
        assert batch["results"] == single
        answers.append([[(h["id"], h["distance"], h["score"]) for h in r["hits"]] for r in single])
        answers[-1].append([(h["id"], h["distance"], h["score"]) for h in image["hits"]])
    assert answers[0] == answers[1]
    assert all(answers[0])  # every search found something
