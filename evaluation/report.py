"""Reports of evaluation runs: mean +- std tables, the results JSON and precision-recall plots.

The results JSON keeps its first keys (`i2t_map`, `t2i_map`: MAP@all) and adds, per run, an
`i2t` and a `t2i` object with the other metrics under the names of OTHER_METRICS; the protocol
object says what each of them means. Each run names its `scoring` (evaluation/protocol.py
SCORINGS), and with short queries it has `t2i_words` and `t2t_words`: {"W": {"map_all", "map@r",
"p@10", "queries"}} for each W (models/features/short_text.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
import numpy as np  # noqa: E402

from common.fsio import atomic_write_bytes  # noqa: E402
from evaluation.metrics import mean_curve  # noqa: E402
from evaluation.protocol import (  # noqa: E402
    CUTOFFS,
    INSTANCE_CUTOFFS,
    METRIC,
    WORDS_CUTOFF,
    DirectionScore,
    RunResult,
    WordsScore,
)

# The metrics beside MAP@all: (name in the JSON and the second table, definition).
OTHER_METRICS: tuple[tuple[str, str], ...] = (
    ("map@r", "MAP@R (Musgrave et al. 2020): AP over the top R ranks divided by R, R = the "
     "query's relevant count in the database"),
    *((f"p@{k}", f"precision in the top {k} of the database") for k in CUTOFFS),
    *((f"r@{k}", f"recall in the top {k} of the database") for k in CUTOFFS),
    *(
        (f"instance-r@{k}", f"share of queries whose own pair ranks in the top {k} among the "
         "query pairs' other modality (Flickr30K / MS-COCO Recall@K)")
        for k in INSTANCE_CUTOFFS
    ),
)  # fmt: skip


def other_metrics(score: DirectionScore) -> dict[str, float]:
    """One direction's metrics beside MAP@all, by their OTHER_METRICS names."""
    values = {"map@r": score.map_r}
    values.update({f"p@{k}": v for k, v in score.precision_at.items()})
    values.update({f"r@{k}": v for k, v in score.recall_at.items()})
    values.update({f"instance-r@{k}": v for k, v in score.instance_recall_at.items()})
    return values


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
    return float(np.mean(arr)), std


def row_name(run: RunResult, results: Sequence[RunResult]) -> str:
    """A table row's name: the method, with its scoring when the results have several."""
    if len({r.scoring for r in results}) > 1:
        return f"{run.method} ({run.scoring})"
    return run.method


def format_table(results: Sequence[RunResult], *, dataset: str) -> str:
    """A text table: one row per method (and scoring), MAP@all mean +- std over seeds per
    direction and L."""
    names = list(dict.fromkeys(row_name(r, results) for r in results))
    bits = sorted({r.bits for r in results})
    seeds = sorted({r.seed for r in results})
    header = ["method"] + [f"{d} {b}" for d in ("i2t", "t2i") for b in bits]
    rows = [header]
    for name in names:
        row = [name]
        for direction in ("i2t", "t2i"):
            for b in bits:
                vals = [
                    getattr(r, direction).map_all
                    for r in results
                    if row_name(r, results) == name and r.bits == b
                ]
                mean, std = mean_std(vals) if vals else (float("nan"), float("nan"))
                row.append(f"{mean:.4f} +- {std:.4f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"{dataset}: {METRIC}, mean +- std over seeds {seeds} (sample std)",
        *(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ),
    ]
    return "\n".join(lines)


def format_other_metrics(results: Sequence[RunResult], *, dataset: str) -> str:
    """The second table: one row per method (and scoring), direction and L; OTHER_METRICS
    mean +- std."""
    methods = list(dict.fromkeys(row_name(r, results) for r in results))
    bits = sorted({r.bits for r in results})
    seeds = sorted({r.seed for r in results})
    names = [name for name, _ in OTHER_METRICS]
    header = ["method", "dir", "bits", *(n.replace("instance-", "inst-") for n in names)]
    rows = [header]
    for method in methods:
        for direction in ("i2t", "t2i"):
            for b in bits:
                runs = [r for r in results if row_name(r, results) == method and r.bits == b]
                if not runs:
                    continue
                per_run = [other_metrics(getattr(r, direction)) for r in runs]
                cells = [_short(*mean_std([m[n] for m in per_run])) for n in names]
                rows.append([method, direction, str(b), *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"{dataset}: MAP@R, P@K, R@K (database, by labels) and instance Recall@K (own pair among "
        f"the queries' pairs), mean +- std over seeds {seeds}",
        *(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ),
    ]
    return "\n".join(lines)


def format_words_table(results: Sequence[RunResult], *, dataset: str) -> str:
    """The short-query table: one row per method (and scoring) and L; text->image MAP@all of
    whole captions beside W-word queries, then text->text of W-word queries; "" without them."""
    counts = sorted({w for r in results for w in r.t2i_words})
    if not counts:
        return ""
    names = list(dict.fromkeys(row_name(r, results) for r in results))
    bits = sorted({r.bits for r in results})
    seeds = sorted({r.seed for r in results})
    header = [
        "method", "bits", "t2i whole", *(f"t2i {w}w" for w in counts),
        *(f"t2t {w}w" for w in counts),
    ]  # fmt: skip
    rows = [header]
    for name in names:
        for b in bits:
            runs = [r for r in results if row_name(r, results) == name and r.bits == b]
            if not runs:
                continue
            cells = [_short(*mean_std([r.t2i.map_all for r in runs]))]
            for part in ("t2i_words", "t2t_words"):
                for w in counts:
                    vals = [getattr(r, part)[w].map_all for r in runs if w in getattr(r, part)]
                    cells.append(_short(*mean_std(vals)) if vals else "-")
            rows.append([name, str(b), *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    queries = {w: runs[0].t2i_words[w].queries for w in counts if w in runs[0].t2i_words}
    lines = [
        f"{dataset}: short text queries (each query caption cut to W of its known words, a fixed "
        f"seed), MAP@all mean +- std over seeds {seeds}; queries with a known word: "
        + ", ".join(f"{w}w {n}" for w, n in queries.items()),
        *(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ),
    ]
    return "\n".join(lines)


def words_document(scores: dict[int, WordsScore]) -> dict[str, dict[str, float | int]]:
    """{"W": {"map_all", "map@r", "p@10", "queries"}} of one direction's short queries."""
    return {
        str(w): {
            "map_all": v.map_all,
            "map@r": v.map_r,
            f"p@{WORDS_CUTOFF}": v.precision_at,
            "queries": v.queries,
        }
        for w, v in scores.items()
    }


def _short(mean: float, std: float) -> str:
    """.245+-.004: three decimals without the leading zero keep 10 metric columns readable."""
    return f"{mean:.3f}+-{std:.3f}".replace("0.", ".")


def results_document(
    results: Sequence[RunResult], *, dataset: str, n_query: int, n_database: int
) -> dict[str, Any]:
    """The results JSON: dataset, protocol (sizes, metric, seeds, the other metrics' meanings) and
    one row per run (MAP@all as i2t_map / t2i_map, the other metrics under i2t / t2i)."""
    return {
        "dataset": dataset,
        "protocol": {
            "queries": n_query,
            "database": n_database,
            "metric": METRIC,
            "seeds": sorted({r.seed for r in results}),
            "other_metrics": dict(OTHER_METRICS),
        },
        "results": [
            {
                "method": r.method,
                "bits": r.bits,
                "seed": r.seed,
                "scoring": r.scoring,
                "i2t_map": r.i2t.map_all,
                "t2i_map": r.t2i.map_all,
                "i2t": other_metrics(r.i2t),
                "t2i": other_metrics(r.t2i),
                **(
                    {
                        "t2i_words": words_document(r.t2i_words),
                        "t2t_words": words_document(r.t2t_words),
                    }
                    if r.t2i_words
                    else {}
                ),
            }
            for r in results
        ],
    }


def write_json(document: dict[str, Any], path: Path) -> None:
    """Write `document` to `path` atomically and durably (common.fsio)."""
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def plot_pr_curves(results: Sequence[RunResult], *, dataset: str, bits: int, path: Path) -> None:
    """Save one PNG with the i2t and t2i precision-recall curves of every method at `bits`.

    Each curve is the mean over seeds. Binary methods move along the Hamming radius; real-valued
    ones (dashed) along rank cut-offs, as their legend entry says.
    """
    runs = [r for r in results if r.bits == bits]
    methods = list(dict.fromkeys(row_name(r, results) for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, direction, title in zip(
        axes,
        ("i2t", "t2i"),
        ("image query -> text database", "text query -> image database"),
        strict=True,
    ):
        for method in methods:
            curves = [getattr(r, direction).curve for r in runs if row_name(r, results) == method]
            precision, recall = mean_curve(
                np.stack([c.precision for c in curves]), np.stack([c.recall for c in curves])
            )
            by = curves[0].by
            ax.plot(
                recall,
                precision,
                linestyle="-" if by == "hamming radius" else "--",
                marker="." if by == "hamming radius" else None,
                label=f"{method} (by {by})",
            )
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.suptitle(f"{dataset}, {bits} bits: precision-recall (mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
