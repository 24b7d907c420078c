"""Chinese tokens ("words": jieba's accurate mode; "search": its search-engine mode) from the
tokenizer through the vectorizer, the checkpoint, `cmh train` and the served encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import InputError
from indexes.codes import pack_codes
from models.data.dataset import PairDataset
from models.features.image import load_backbone
from models.features.pipeline import fit_text_features, text_vectorizer
from models.features.text import DEFAULT_TOKENS, TOKENIZATIONS, TextVectorizer, tokenize
from models.methods.compare import METHODS, Method, evaluate_methods
from models.network.aucmh import HashingModel
from models.network.checkpoint import load_checkpoint, save_checkpoint
from service.encoder import Encoder

NEWS = "国务院新闻办公室举行新闻发布会介绍中华人民共和国经济发展"
TEXTS = [
    NEWS,
    "新闻办公室发布经济数据",
    "人民日报报道共和国发展",
    "中华文化在海外华人中传播",
    "经济发展新闻发布会",
    "国务院办公厅发布通知",
    "the council met the press",
    "经济 news and 发展",
]


def test_search_mode_adds_the_shorter_words_inside_long_ones() -> None:
    words, search = tokenize(NEWS), tokenize(NEWS, tokens_mode="search")
    assert "中华人民共和国" in words and "人民" not in words
    assert set(words) <= set(search) and {"人民", "共和国", "发布", "办公室"} <= set(search)
    english = "The Council met the Press"
    assert (
        tokenize(english, tokens_mode="search") == tokenize(english) == ["council", "met", "press"]
    )


def test_the_data_layer_defaults_to_the_features_default_tokens() -> None:
    # models/data cannot import models/features, so PairDataset spells the default out.
    field = PairDataset.__dataclass_fields__["text_tokens"]
    assert field.default == DEFAULT_TOKENS == TOKENIZATIONS[0]


def test_the_vectorizer_fits_counts_and_keeps_its_tokens() -> None:
    words = TextVectorizer.fit(TEXTS, min_df=1)
    search = TextVectorizer.fit(TEXTS, min_df=1, tokens="search", weighting="tfidf")
    assert words.tokens == "words" and search.tokens == "search"
    assert "人民" in search.vocabulary and "人民" not in words.vocabulary
    again = TextVectorizer.from_dict(json.loads(search.to_json()))
    assert again.tokens == "search" and again.vocabulary == search.vocabulary
    assert np.array_equal(again.transform(TEXTS)[0], search.transform(TEXTS)[0])
    # The same vocabulary cut the other way finds fewer of its words in a text.
    cut_as_words = TextVectorizer(search.vocabulary)
    assert len(cut_as_words.columns([NEWS])[0]) < len(search.columns([NEWS])[0])
    old = {"vocabulary": ["新闻"], "language": "auto", "weighting": "binary"}  # before tokens
    assert TextVectorizer.from_dict(old).tokens == "words" == DEFAULT_TOKENS
    with pytest.raises(InputError, match="expected text tokens in words, search, got 'chars'"):
        TextVectorizer(["新闻"], tokens="chars")
    with pytest.raises(InputError, match="expected text tokens in words, search, got 'chars'"):
        TextVectorizer.fit(TEXTS, tokens="chars")


def _dataset() -> PairDataset:
    idx = np.arange(len(TEXTS), dtype=np.int64)
    return PairDataset(
        name="news", ids=[str(i) for i in idx], labels=np.eye(len(TEXTS), dtype=np.uint8),
        train_idx=idx[:6], query_idx=idx[6:], database_idx=idx[:6], texts=TEXTS,
    )  # fmt: skip


def _checkpoint(tmp_path: Path, tokens: str) -> tuple[Path, TextVectorizer]:
    """A served-shape checkpoint (Lite0 image width) on tf-idf text cut as `tokens`."""
    data = _dataset()
    features, vectorizer = fit_text_features(data, vocab_size=100, weighting="tfidf", tokens=tokens)
    fitted = data.with_features(
        image=np.zeros((len(TEXTS), 2)), text=features, image_backbone="x",
        vocabulary=vectorizer.vocabulary, text_tokens=tokens,
    )  # fmt: skip
    # The pipeline rebuilds the same vectorizer (and idf) from the dataset's record of it.
    rebuilt = text_vectorizer(fitted, "tfidf")
    assert rebuilt.tokens == tokens and np.array_equal(rebuilt.idf, vectorizer.idf)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    model = HashingModel(
        image_dim=1280, text_dim=vectorizer.dim, n_bits=32, image_hidden=(16,),
        text_hidden=(64,),
    )  # fmt: skip
    model.fit_statistics(rng.standard_normal((len(TEXTS), 1280)), features)
    model.eval()
    path = tmp_path / f"{tokens}.pt"
    save_checkpoint(
        path, model=model, train_config={}, history=[], vocabulary=vectorizer.vocabulary,
        image_backbone="efficientnet-lite0", dataset="news", text_weighting="tfidf",
        idf=vectorizer.idf, text_tokens=tokens,
    )  # fmt: skip
    return path, vectorizer


def test_the_checkpoint_keeps_the_tokens_and_older_versions_read_as_words(tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path, "search")
    assert load_checkpoint(path).text_tokens == "search"
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 4 and payload["text_tokens"] == "search"
    payload["version"] = 3
    del payload["text_tokens"]
    torch.save(payload, tmp_path / "v3.pt")
    assert load_checkpoint(tmp_path / "v3.pt").text_tokens == "words"
    payload["version"], payload["text_tokens"] = 4, "chars"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"expected text tokens in words, search.*\(in .*bad.pt\)"):
        load_checkpoint(tmp_path / "bad.pt")
    del payload["text_tokens"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(InputError, match="expected a 'text_tokens' entry in checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_the_served_encoder_cuts_queries_as_the_checkpoint_was_trained(tmp_path: Path) -> None:
    path, vectorizer = _checkpoint(tmp_path, "search")
    ckpt = load_checkpoint(path)
    queries = ["新闻发布会", "中华人民共和国", NEWS, "人民", "council news 经济"]
    offline = pack_codes(ckpt.model.encode_text(vectorizer.transform(queries)[0]))
    words = TextVectorizer(vectorizer.vocabulary, weighting="tfidf", idf=vectorizer.idf)
    as_words = pack_codes(ckpt.model.encode_text(words.transform(queries)[0]))
    assert not np.array_equal(offline, as_words)  # cutting queries as words would show here
    encoder = Encoder(ckpt, load_backbone(ckpt.image_backbone), window_ms=0.0, max_batch=1)
    try:
        served, unknown = encoder.encode_texts(queries)
    finally:
        encoder.close()
    assert np.array_equal(served, offline) and not unknown.any()


def test_a_method_on_search_tokens_is_fitted_on_a_vocabulary_refitted_so() -> None:
    data = _dataset()
    features, vectorizer = fit_text_features(data, vocab_size=100)
    prepared = data.with_features(
        image=np.random.default_rng(0).standard_normal((len(TEXTS), 8)), text=features,
        image_backbone="x", vocabulary=vectorizer.vocabulary,
    )  # fmt: skip
    seen: list[PairDataset] = []

    class Signs:
        def encode_image(self, x: np.ndarray) -> np.ndarray:
            return np.where(x[:, :8] > 0, 1.0, -1.0)

        def encode_text(self, x: np.ndarray) -> np.ndarray:  # any vocabulary's width
            return np.where(x.sum(axis=1, keepdims=True) > 0, 1.0, -1.0).repeat(8, axis=1)

    def fit(
        d: PairDataset, n_bits: int, seed: int, /, cache: object = None, processes: int = 1
    ) -> Signs:
        del n_bits, seed, cache, processes
        seen.append(d)
        return Signs()

    methods = [
        Method("words", fit),
        Method("search", fit, text_weighting="tfidf", text_tokens="search"),
    ]
    evaluate_methods(prepared, methods=methods, bits=[8], seeds=[0], vocab_size=100)
    words, search = seen
    assert words is prepared and search.text_tokens == "search"
    expected, refitted = fit_text_features(data, vocab_size=100, weighting="tfidf", tokens="search")
    assert search.vocabulary == refitted.vocabulary != prepared.vocabulary
    assert np.array_equal(search.text_features, expected)  # type: ignore[arg-type]
    assert np.array_equal(search.image_features, prepared.image_features)  # type: ignore[arg-type]
    for name in ("aucmh-tfidf-search", "aucmh-tfidf-search-graph-text-0.8"):
        assert (METHODS[name].text_weighting, METHODS[name].text_tokens) == ("tfidf", "search")
