"""Bag-of-words text features: tokenisation, training-only vocabulary, unknown words, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from models.features.text import TextVectorizer, tokenize


def test_english_tokens_drop_stop_words_and_punctuation() -> None:
    assert tokenize("A large Red car, on the LEFT!") == ["large", "red", "car", "left"]


def test_chinese_is_segmented_with_jieba() -> None:
    assert tokenize("彩色包衣的蔬菜种子。") == ["彩色", "包衣", "蔬菜种子"]  # no 的, no 。


def test_vocabulary_comes_from_training_texts_only() -> None:
    train = ["red car", "blue car", "red boat", "blue boat"]
    vec = TextVectorizer.fit(train, vocab_size=10, min_df=2)
    assert sorted(vec.vocabulary) == ["blue", "boat", "car", "red"]
    features, unknown = vec.transform(["red fish", "green fish", "blue car car"])
    assert features.dtype == np.float32 and features.shape == (3, 4)
    col = {w: i for i, w in enumerate(vec.vocabulary)}
    assert features[0, col["red"]] == 1 and features[0].sum() == 1  # "fish" is unknown: ignored
    assert features[2].sum() == 2 and features.max() == 1  # binary, not counts
    assert unknown.tolist() == [False, True, False]  # "green fish" has no known word: zeros


def test_vocab_size_keeps_the_most_frequent_words() -> None:
    vec = TextVectorizer.fit(["a1 b2", "a1 b2", "a1 c3", "a1 c3", "a1"], vocab_size=2, min_df=1)
    assert set(vec.vocabulary) == {"a1", "b2"} or set(vec.vocabulary) == {"a1", "c3"}
    assert "a1" in vec.vocabulary


def test_the_exported_vocabulary_rebuilds_the_same_vectorizer(tmp_path: Path) -> None:
    vec = TextVectorizer.fit(["体育 比赛 新闻", "体育 新闻", "比赛 结果"], min_df=1)
    vec.save(tmp_path / "vocab.json")
    data = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert data == {
        "vocabulary": vec.vocabulary,
        "language": vec.language,
        "tokens": "words",
        "weighting": "binary",
    }
    again = TextVectorizer.from_dict(data)
    texts = ["体育比赛", "新闻结果"]
    assert np.array_equal(again.transform(texts)[0], vec.transform(texts)[0])
    assert "体育" in (tmp_path / "vocab.json").read_text(encoding="utf-8")  # readable, not escaped


def test_bad_inputs_are_input_errors() -> None:
    with pytest.raises(InputError, match="training texts with words"):
        TextVectorizer.fit(["", "!!"], min_df=1)
    with pytest.raises(InputError, match="vocab_size >= 1"):
        TextVectorizer.fit(["a b"], vocab_size=0)
    with pytest.raises(InputError, match="language"):
        TextVectorizer(["a"], language="fr")
