"""What people type, read against a vocabulary (models/features/query_words.py): Chinese
compounds to their known parts, English inflections to a known form, full-width and case
folded, stop words and unknown words named; on the real Web News vocabulary too."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data.webnews import load_web_news
from models.features.query_words import QueryReader, suggested_words
from models.features.text import TextVectorizer

VOCABULARY = ["足球", "比赛", "熊猫", "大熊", "运动", "动员", "car", "run", "match", "news", "2024"]


def reader(weighting: str = "binary", tokens: str = "words") -> QueryReader:
    idf = np.linspace(1.0, 3.0, len(VOCABULARY)) if weighting == "tfidf" else None
    return QueryReader(TextVectorizer(VOCABULARY, weighting=weighting, idf=idf, tokens=tokens))


def test_a_chinese_compound_the_vocabulary_lacks_is_cut_into_its_known_words() -> None:
    read = reader().read("足球比赛")
    assert read.used == ["足球", "比赛"] and read.unknown == []
    assert read.columns.tolist() == [0, 1]
    # Overlapping parts: the more frequent in jieba's dictionary wins (熊猫 over 大熊), and
    # what no known part covers is named.
    panda = reader().read("大熊猫")
    assert panda.used == ["熊猫"] and panda.unknown == ["大"]
    assert reader().read("运动员").used == ["运动"]  # not 动员 ("mobilise"), which overlaps it


def test_english_inflections_case_and_full_width_map_to_known_words() -> None:
    read = reader().read("Cars RUNNING matches")
    assert read.used == ["car", "run", "match"] and read.unknown == []
    assert reader().read("ＣＡＲＳ　２０２４").used == [
        "car",
        "2024",
    ]  # full width, ideographic space
    stop = reader().read("the cars of zebras")
    assert stop.used == ["car"] and stop.unknown == ["the", "of", "zebras"]  # in query order
    # A stop word has no fallback, even one whose stem is a known word's ("becoming": become).
    becoming = QueryReader(TextVectorizer(["become", "car"])).read("becoming cars")
    assert becoming.used == ["car"] and becoming.unknown == ["becoming"]


def test_a_query_without_known_words_names_every_ignored_word() -> None:
    read = reader().read("火箭 and rockets")
    assert read.used == [] and read.columns.size == 0
    assert read.unknown == ["火箭", "and", "rockets"]
    assert reader().read("!!! ...").unknown == []


def test_the_query_gets_the_weighting_values_of_its_words() -> None:
    tfidf = reader("tfidf")
    read = tfidf.read("足球比赛 足球")  # 足球 twice: once from the compound, once alone
    counts = np.array([2, 1])
    assert read.columns.tolist() == [0, 1]
    assert np.array_equal(read.values, tfidf.vectorizer.values_of(read.columns, counts))
    assert read.used == ["足球", "比赛"]
    # A text the vocabulary knows as it is reads exactly as training reads it.
    text = "足球 比赛 car news"
    columns, values = tfidf.vectorizer.weighted([text])
    again = tfidf.read(text)
    assert np.array_equal(again.columns, columns[0]) and np.array_equal(again.values, values[0])


def test_under_search_segmentation_the_cut_already_yields_the_parts() -> None:
    read = reader(tokens="search").read("足球比赛")
    assert read.used == ["足球", "比赛"] and read.unknown == []  # once each, not twice
    assert read.columns.tolist() == [0, 1]


def test_suggested_words_are_frequent_informative_words_of_the_collection() -> None:
    vectorizer = TextVectorizer(VOCABULARY)
    texts = ["足球 比赛"] * 3 + ["car news"] * 5 + ["run 2024"] * 2 + ["match"] * 1 + ["x"] * 9
    # df: car = news = 5, 足球 = 比赛 = 3, run = 2024 = 2, match = 1 (too rare); 2024 is a number.
    assert suggested_words(vectorizer, texts, 5) == ["car", "news", "足球", "比赛", "run"]
    assert suggested_words(vectorizer, [], 5) == []


def test_the_real_cases_on_the_web_news_vocabulary(web_news_root: Path) -> None:
    """The issue's queries against the vocabulary `cmh train` fits on Web News (2,000 words)."""
    data = load_web_news(web_news_root)
    texts = [data.texts[i] for i in data.train_idx]
    web_news = QueryReader(TextVectorizer.fit(texts, vocab_size=2000))
    vocabulary = set(web_news.vectorizer.vocabulary)
    assert "比赛" in vocabulary and "足球" not in vocabulary and "足球比赛" not in vocabulary
    match = web_news.read("足球比赛")
    assert match.used == ["比赛"] and match.unknown == ["足球"]
    assert web_news.read("大熊猫").used == ["大熊猫"]  # known as it is: no fallback
    assert web_news.read("火箭").used == ["火箭"]
    nothing = web_news.read("足球")
    assert nothing.used == [] and nothing.unknown == ["足球"]
