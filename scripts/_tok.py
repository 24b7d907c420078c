"""Exploratory, not committed: Web News tf-idf with another Chinese tokenization."""
import sys

import jieba

import models.features.text as text
from scripts import quality_study

MODE = sys.argv.pop(1)
_original = text.tokenize


def search_mode(t: str, language: str = "auto") -> list[str]:
    t = t.lower()
    if text.CJK.search(t):
        return [
            tok.strip() for tok in jieba.lcut_for_search(t)
            if tok.strip() and tok.strip() not in text.ZH_STOP_WORDS
            and (text.CJK.search(tok.strip()) or text.WORD.fullmatch(tok.strip()))
        ]
    return _original(t, language)


def words_and_bigrams(t: str, language: str = "auto") -> list[str]:
    tokens = _original(t, language)
    runs = text.re.findall(r"[\u3400-\u9fff\uf900-\ufaff]+", t.lower())
    return tokens + [r[i : i + 2] for r in runs for i in range(len(r) - 1)]


text.tokenize = {"search": search_mode, "bigrams": words_and_bigrams}[MODE]
if __name__ == "__main__":
    quality_study.main()
