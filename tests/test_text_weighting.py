"""Text weighting (binary, log counts, tf-idf) end to end: vectorizer, checkpoint, fast path, service.

scikit-learn is the oracle for counts and tf-idf; torch's `encode_text` on the dense vectors is the
oracle for the fast path's codes; the served model is checked against the offline encoding over
real HTTP (TestClient with its lifespan) on a store whose codes were made offline.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

from cli.main import main
from common.errors import InputError
from indexes.codes import pack_codes
from models.data.dataset import PairDataset
from models.features.image import load_backbone
from models.features.pipeline import fit_text_features, prepare, reweight, text_vectorizer
from models.features.text import TextVectorizer, tokenize
from models.methods.compare import METHODS, Method, evaluate_methods
from models.network.aucmh import HashingModel
from models.network.checkpoint import load_checkpoint, save_checkpoint
from models.network.text_path import TextPath
from service.app import create_app
from service.encoder import Encoder
from service.settings import Settings
from store.layout import CHECKPOINT_NAME
from store.manifest import manifest_for
from store.rows import NewItems
from store.store import Store

WORDS = [f"w{i}" for i in range(300)]


def _texts(rng: np.random.Generator, count: int) -> list[str]:
    """Texts of 0-40 words drawn with repeats (counts above 1) from WORDS, a few unknown."""
    pool = np.array([*WORDS, "zebra", "the", "!!"], dtype=object)
    # A skewed draw: low columns are frequent (low idf), high ones rare, so tf-idf is not binary.
    p = 1.0 / np.arange(1, len(pool) + 1)
    return [
        " ".join(str(w) for w in rng.choice(pool, size=s, p=p / p.sum()))
        for s in rng.integers(0, 41, size=count)
    ]


def test_counts_and_tfidf_are_scikit_learns(rng: np.random.Generator) -> None:
    fitting, texts = _texts(rng, 400), _texts(rng, 300) + ["", "zebra"]
    binary = TextVectorizer(WORDS)
    vec = binary.with_weighting("tfidf", fitting)
    analyzer = {"analyzer": lambda t: tokenize(t, "auto"), "vocabulary": WORDS}
    counts = CountVectorizer(**analyzer).transform(texts).toarray()
    cols, got = binary.counts(texts)
    assert np.array_equal(binary.dense(cols, [c.astype(np.float32) for c in got]), counts)
    log = TextVectorizer(WORDS, weighting="log").transform(texts)[0]
    assert log.dtype == np.float32 and np.allclose(log, np.log1p(counts), rtol=1e-7, atol=0)
    sklearn = TfidfVectorizer(**analyzer, dtype=np.float64).fit(fitting)
    assert np.allclose(vec.idf, sklearn.idf_, rtol=1e-15, atol=0)
    features, unknown = vec.transform(texts)
    expected = sklearn.transform(texts).toarray()
    # float64 rounded once to float32: within half a float32 ulp of scikit-learn's float64.
    assert np.allclose(features, expected, rtol=2**-24, atol=0)
    assert unknown.tolist() == [not row.any() for row in expected]
    assert not np.array_equal(features > 0, features)  # the weights are not all ones


def test_json_keeps_the_weighting_and_old_json_reads_as_binary(rng: np.random.Generator) -> None:
    vec = TextVectorizer(WORDS).with_weighting("tfidf", _texts(rng, 100))
    again = TextVectorizer.from_dict(json.loads(vec.to_json()))
    texts = _texts(rng, 50)
    assert again.weighting == "tfidf" and again.idf is not None
    assert np.array_equal(again.idf, vec.idf)
    assert np.array_equal(again.transform(texts)[0], vec.transform(texts)[0])
    old = TextVectorizer.from_dict({"vocabulary": ["cat", "dog"], "language": "en"})
    assert old.weighting == "binary" and old.idf is None and old.language == "en"
    with pytest.raises(InputError, match="expected an idf vector"):
        TextVectorizer.from_dict({"vocabulary": ["cat"], "weighting": "tfidf"})
    with pytest.raises(InputError, match="expected a text weighting"):
        TextVectorizer(["cat"], weighting="bm25")
    with pytest.raises(InputError, match="expected 2 positive finite idf"):
        TextVectorizer(["cat", "dog"], weighting="tfidf", idf=[1.0])


def _dataset(texts: list[str]) -> PairDataset:
    n = len(texts)
    idx = np.arange(n, dtype=np.int64)
    return PairDataset(
        name="texts", ids=[str(i) for i in idx], labels=np.eye(n, dtype=np.uint8),
        train_idx=idx[: n // 2], query_idx=idx[n // 2 :], database_idx=idx[: n // 2], texts=texts,
    )  # fmt: skip


def test_the_pipeline_counts_idf_on_the_training_part_only(rng: np.random.Generator) -> None:
    texts = _texts(rng, 200)
    data = _dataset(texts)
    features, vec = fit_text_features(data, vocab_size=2000, weighting="tfidf")
    fitted = TextVectorizer.fit(texts[:100], weighting="tfidf")
    assert vec.vocabulary == fitted.vocabulary and np.array_equal(vec.idf, fitted.idf)
    assert np.array_equal(features, fitted.transform(texts)[0])
    prepared = data.with_features(
        image=np.zeros((200, 1)), text=features, image_backbone="x", vocabulary=vec.vocabulary
    )
    # Re-weighting a prepared dataset rebuilds the same vectorizer from its training part...
    assert np.array_equal(text_vectorizer(prepared, "tfidf").idf, vec.idf)
    assert np.array_equal(reweight(prepared, "tfidf").text_features, features)
    # ...and another training part gives another idf (the queries never count).
    other = dataclasses.replace(prepared, train_idx=np.arange(100, 200))
    assert not np.array_equal(text_vectorizer(other, "tfidf").idf, vec.idf)
    with pytest.raises(InputError, match="text features only"):
        reweight(dataclasses.replace(prepared, texts=None), "log")


def test_a_weighted_method_is_fitted_and_scored_on_its_weighting(rng: np.random.Generator) -> None:
    texts = _texts(rng, 200)
    features, vec = fit_text_features(_dataset(texts), vocab_size=2000)
    data = _dataset(texts).with_features(
        image=rng.standard_normal((200, 8)), text=features, image_backbone="x",
        vocabulary=vec.vocabulary,
    )  # fmt: skip
    seen: list[np.ndarray] = []

    class Project:
        """Codes from the first bits of each text's features: what was encoded shows in them."""

        def encode_image(self, x: np.ndarray) -> np.ndarray:
            return np.where(x[:, :8] > 0, 1.0, -1.0)

        def encode_text(self, x: np.ndarray) -> np.ndarray:
            return np.where(x[:, :8] > x[:, :8].mean(), 1.0, -1.0)

    def fit(
        d: PairDataset, n_bits: int, seed: int, /, cache: object = None, processes: int = 1
    ) -> Project:
        del n_bits, seed, cache, processes
        assert d.text_features is not None
        seen.append(d.text_features)
        return Project()

    methods = [Method("plain", fit), Method("weighted", fit, text_weighting="tfidf")]
    results = evaluate_methods(data, methods=methods, bits=[8], seeds=[0])
    plain, weighted = seen
    assert np.array_equal(plain, features)
    assert np.array_equal(weighted, reweight(data, "tfidf").text_features)
    assert not np.array_equal(plain, weighted)
    assert [r.method for r in results] == ["plain", "weighted"]
    assert "aucmh-tfidf" in METHODS and METHODS["aucmh-tfidf"].text_weighting == "tfidf"


def _model(
    input_norm: str, hidden: tuple[int, ...], dropout: float, fit: np.ndarray
) -> HashingModel:
    torch.manual_seed(0)
    model = HashingModel(
        image_dim=4, text_dim=len(WORDS), n_bits=32, image_hidden=(4,), text_hidden=hidden,
        input_norm=input_norm, dropout=dropout,
    )  # fmt: skip
    model.fit_statistics(np.random.default_rng(1).standard_normal((len(fit), 4)), fit)
    model.eval()
    return model


@pytest.mark.parametrize("weighting", ["log", "tfidf"])
@pytest.mark.parametrize(
    ("input_norm", "hidden", "dropout"),
    [
        ("zscore", (256,), 0.3),
        ("l2", (256,), 0.3),
        ("l2", (64, 32), 0.0),
        ("zscore", (64, 32), 0.0),
    ],
)
def test_weighted_codes_equal_torchs(
    weighting: str, input_norm: str, hidden: tuple[int, ...], dropout: float,
    rng: np.random.Generator,
) -> None:  # fmt: skip
    vec = TextVectorizer(WORDS).with_weighting(weighting, _texts(rng, 500))
    model = _model(input_norm, hidden, dropout, vec.transform(_texts(rng, 500))[0])
    path = TextPath.from_model(model, weighted=True)
    assert path is not None and path.weighted
    texts = _texts(rng, 3000) + ["", "zebra", " ".join(WORDS), "w0 " * 300]
    columns, values = vec.weighted(texts)
    expected = model.encode_text(vec.dense(columns, values))
    assert np.array_equal(path.encode(columns, values), expected)
    logits = path.logits(columns, values)
    assert logits.uncertain().mean() < 0.05  # the fast path decides nearly every text
    certain = ~logits.uncertain()
    assert np.array_equal(np.where(logits.z > 0, 1, -1)[certain], expected[certain])
    for i in range(0, len(texts), 40):  # one by one, as a request
        one = path.encode([columns[i]], [values[i]])
        assert np.array_equal(one, model.encode_text(vec.dense([columns[i]], [values[i]])))
    # Binary columns alone would give other codes: the values are what is encoded.
    assert not np.array_equal(path.model.encode_text(vec.dense(columns)), expected)
    with pytest.raises(ValueError, match="expected values"):
        path.encode(columns)


def _trained(tmp_path: Path, rng: np.random.Generator, weighting: str) -> tuple[Path, list[str]]:
    """A served-shape checkpoint (EfficientNet-Lite0 image width) on weighted text, and texts."""
    texts = _texts(rng, 60)
    vec = TextVectorizer(WORDS).with_weighting(weighting, texts)
    model = HashingModel(
        image_dim=1280, text_dim=len(WORDS), n_bits=32, image_hidden=(16,), text_hidden=(128,),
        dropout=0.3,
    )  # fmt: skip
    model.fit_statistics(rng.standard_normal((60, 1280)), vec.transform(texts)[0])
    model.eval()
    path = tmp_path / "artifacts" / CHECKPOINT_NAME
    path.parent.mkdir()
    save_checkpoint(
        path, model=model, train_config={}, history=[], vocabulary=WORDS,
        image_backbone="efficientnet-lite0", dataset="texts", text_weighting=weighting,
        idf=vec.idf,
    )  # fmt: skip
    return path, texts


def test_the_checkpoint_keeps_the_weighting(tmp_path: Path, rng: np.random.Generator) -> None:
    path, texts = _trained(tmp_path, rng, "tfidf")
    ckpt = load_checkpoint(path)
    assert ckpt.text_weighting == "tfidf" and ckpt.idf is not None and ckpt.idf.dtype == np.float64
    assert np.array_equal(ckpt.idf, TextVectorizer(WORDS).with_weighting("tfidf", texts).idf)
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 4 and payload["text_weighting"] == "tfidf"
    payload["idf"] = None
    torch.save(payload, tmp_path / "no-idf.pt")
    with pytest.raises(InputError, match=r"expected an idf vector .*\(in .*no-idf.pt\)"):
        load_checkpoint(tmp_path / "no-idf.pt")
    payload["text_weighting"], payload["vocabulary"] = "log", None
    torch.save(payload, tmp_path / "no-vocabulary.pt")
    with pytest.raises(InputError, match="expected a vocabulary with text weighting 'log'"):
        load_checkpoint(tmp_path / "no-vocabulary.pt")


def test_a_served_tfidf_model_searches_with_the_offline_code(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    path, texts = _trained(tmp_path, rng, "tfidf")
    ckpt = load_checkpoint(path)
    vec = TextVectorizer(WORDS, weighting="tfidf", idf=ckpt.idf)
    offline = ckpt.model.encode_text(vec.transform(texts)[0])  # what `cmh evaluate` encodes
    codes = pack_codes(offline)
    manifest = manifest_for(path, n_bits=32, backbone="efficientnet-lite0", vocabulary=WORDS)
    store = Store.create(path.parent, manifest)
    try:
        store.add(
            NewItems(
                ids=list(range(len(texts))),
                texts=texts,
                images=[f"images/{i}.jpg" for i in range(len(texts))],
                image_codes=codes,
                text_codes=codes,
            )  # fmt: skip
        )
    finally:
        store.close()
    queries = [t for t in _texts(rng, 40) if t.strip()]
    expected = ckpt.model.encode_text(vec.transform(queries)[0])
    binary = ckpt.model.encode_text(vec.dense(vec.columns(queries)))
    assert not np.array_equal(binary, expected)  # a binary encoding would show here
    with TestClient(create_app(Settings(artifacts_dir=path.parent))) as client:
        for query, code in zip(queries, expected, strict=True):
            reply = client.post(
                "/v1/search/text", json={"text": query, "k": len(texts), "target": "text"}
            )
            assert reply.status_code == 200, reply.text
            got = {hit["id"]: hit["distance"] for hit in reply.json()["hits"]}
            # Every distance is the offline query code's: the served code is that code (the
            # items' codes differ enough to pin it: checked by the binary codes' distances).
            want = {i: int((code != item).sum()) for i, item in enumerate(offline)}
            assert got == want


def test_cmh_train_records_the_weighting_and_tokens_the_service_encodes_with(
    demo_root: Path, feature_cache: Path, demo_data: PairDataset, tmp_path: Path
) -> None:
    out = tmp_path / "model.pt"
    args = ["train", "--dataset", "demo", "--root", str(demo_root), "--cache-dir",
            str(feature_cache), "--out", str(out), "--text-weighting", "log", "--bits", "16",
            "--text-tokens", "search",
            "--k", "5", "--anchors", "20", "--epochs", "2", "--n-val", "10", "--batch-size", "16",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    ckpt = load_checkpoint(out)
    # English text: search-mode tokens (recorded) cut it as the default does.
    assert ckpt.text_weighting == "log" and ckpt.vocabulary == demo_data.vocabulary
    assert ckpt.text_tokens == "search"
    # The features `prepare` trains on with that weighting are the ones the service encodes.
    weighted = prepare("demo", demo_root, cache_dir=feature_cache, text_weighting="log")
    assert weighted.text_features is not None and weighted.texts is not None
    assert not np.array_equal(weighted.text_features, demo_data.text_features)
    encoder = Encoder(ckpt, load_backbone(ckpt.image_backbone), window_ms=0.0, max_batch=1)
    try:
        served, _ = encoder.encode_texts(weighted.texts)
    finally:
        encoder.close()
    assert np.array_equal(served, pack_codes(ckpt.model.encode_text(weighted.text_features)))


def test_a_dataset_of_text_features_is_binary_only(wikipedia_root: Path) -> None:
    with pytest.raises(
        InputError,
        match="wikipedia.* to weight text .tfidf. with .words. tokens, got text features",
    ):
        prepare("wikipedia", wikipedia_root, text_weighting="tfidf")
