"""One-word queries through the product (issue 32): precision of the top 10 by category.

What a new user does, step by step, each a real `cmh` process: `cmh train` with its defaults (or
--method), `cmh index build` of every Web News pair, `cmh serve`, then one text search over HTTP
per word of WORDS, text->image, k 10. A hit is relevant when its pair's category is the word's.
A word the model does not know answers no hits (no_known_words) and scores 0.

WORDS was written once, before any measurement, as words a person would type to find each
category's photos (three per category; the issue's own list of 30 is kept apart from this
project). It is never tuned: a model is chosen on Web News' validation split
(`cmh evaluate --on validation`), and this list only reports.

    .venv/bin/python -m scripts.keyword_probe --root ../shared/data/web-news \
        --workdir /tmp/probe --json docs/results/keyword-probe.json [--method NAME] [--seed 0]

Writes {"method", "seed", "bits", "scoring", "p@10" (mean over words), "by_category",
"words": [{"word", "category", "p@10", "used_words", "unknown_words"}]} to --json.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from common.fsio import atomic_write_bytes
from models.data.loaders import load_dataset
from service.indexing import dataset_ids

# category (as categories.list names it) -> three words a person would type for its photos.
WORDS: dict[str, tuple[str, ...]] = {
    "culture": ("文化", "艺术", "演出"),
    "ecology": ("生态", "环境", "森林"),
    "economy": ("经济", "企业", "市场"),
    "education": ("教育", "学生", "学校"),
    "international": ("国际", "总统", "外交"),
    "National_defense": ("军事", "部队", "演习"),
    "people's_livelihood": ("民生", "居民", "社区"),
    "politics": ("会议", "代表", "政府"),
    "Science_and_technology": ("科技", "卫星", "火箭"),
    "sports": ("比赛", "运动员", "冠军"),
}
K = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cmh(*args: str) -> None:
    print("$ cmh", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cli", *args], check=True)


def probe(
    base: str, categories: list[str], labels: dict[str, int], scoring: str
) -> list[dict[str, Any]]:
    """One search per word; its precision of the top K against the word's category."""
    rows = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for category, words in WORDS.items():
            want = categories.index(category)
            for word in words:
                body = {"text": word, "k": K, "target": "image", "scoring": scoring}
                answer = client.post("/v1/search/text", json=body)
                answer.raise_for_status()
                found = answer.json()
                hits = [labels[str(h["id"])] for h in found["hits"]]
                rows.append(
                    {
                        "word": word,
                        "category": category,
                        "p@10": sum(h == want for h in hits) / K,
                        "used_words": found.get("used_words"),
                        "unknown_words": found.get("unknown_words"),
                    }
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="Web News folder")
    parser.add_argument("--workdir", type=Path, required=True, help="artifacts folder to make")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--method", help="cmh train --method (default: cmh train's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scoring", default="asymmetric", choices=("hamming", "asymmetric"))
    args = parser.parse_args()
    root = args.root.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "model.pt"
    if not model.is_file():
        method = ["--method", args.method] if args.method else []
        _cmh("train", "--dataset", "web-news", "--root", str(root), "--out", str(model),
             "--seed", str(args.seed), *method)  # fmt: skip
    _cmh("index", "build", "--artifacts", str(args.workdir), "--dataset", "web-news",
         "--root", str(root))  # fmt: skip
    data = load_dataset("web-news", root)
    labels = {
        str(i): int(np.argmax(row)) for i, row in zip(dataset_ids(data), data.labels, strict=True)
    }
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "serve",
            "--artifacts",
            str(args.workdir),
            "--port",
            str(port),
        ]  # fmt: skip
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(1)
        info = httpx.get(f"{base}/v1/index/stats", timeout=10).json()
        rows = probe(base, data.label_names, labels, args.scoring)
    finally:
        server.terminate()
        server.wait(timeout=60)
    by_category = {
        c: float(np.mean([r["p@10"] for r in rows if r["category"] == c])) for c in WORDS
    }
    document = {
        "method": args.method or "default",
        "seed": args.seed,
        "bits": info.get("n_bits"),
        "scoring": args.scoring,
        "p@10": float(np.mean([r["p@10"] for r in rows])),
        "words_without_a_relevant_hit": sum(r["p@10"] == 0 for r in rows),
        "by_category": by_category,
        "words": rows,
    }
    atomic_write_bytes(
        args.json, (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode()
    )
    print(json.dumps({k: v for k, v in document.items() if k != "words"}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
