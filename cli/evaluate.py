"""`cmh evaluate`: fit every method on a dataset's training part and score it on its protocol."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.dataset_args import add_dataset_args, prepare_from_args
from common.errors import InputError
from evaluation.protocol import SCORINGS, run_seeds
from evaluation.report import (
    format_other_metrics,
    format_table,
    format_words_table,
    plot_pr_curves,
    results_document,
    write_json,
)
from models.features.short_text import QUERY_WORDS_SEED, parse_query_words
from models.methods.compare import (
    DEFAULT_METHOD,
    METHODS,
    evaluate_methods,
    on_validation,
    parse_methods,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate`."""
    p = subparsers.add_parser(
        "evaluate",
        help="train and score methods (MAP@all and more, both directions) over bits and seeds",
        description="Fit each method on the dataset's training part, rank the database for every "
        "query in both directions (image->text, text->image), and report MAP over the whole "
        "ranked database (mean +- std over seeds), then MAP@R, P@K and R@K (K = 1, 10, 100) and "
        "instance-level Recall@1/5/10 (each query's own pair among the query pairs' other "
        "modality), a results JSON and precision-recall plots.",
    )
    add_dataset_args(p)
    p.add_argument(
        "--methods",
        default="aucmh,cvh,cmfh,cca-itq,lsh,cca",
        help=f"comma-separated, from: default (what `cmh train` trains: {DEFAULT_METHOD}), "
        f"{', '.join(METHODS)} (default: AUCMH and every baseline)",
    )
    p.add_argument(
        "--query-words",
        default="1,2,3",
        help="also score text queries cut to W of their caption's known words, for each W "
        f"(comma-separated; drawn with seed {QUERY_WORDS_SEED}, the same for every run; 'none': "
        "off); needs raw texts (default 1,2,3)",
    )
    p.add_argument(
        "--scoring",
        default="hamming",
        help="comma-separated, from: "
        f"{', '.join(SCORINGS)} (asymmetric: the query's real hash-layer output against the "
        "stored codes, for methods that have one; default hamming, the paper's)",
    )
    p.add_argument(
        "--on",
        choices=("queries", "validation"),
        default="queries",
        help="queries: the dataset's protocol; validation: a fifth of the training part as "
        "queries against the rest (which trains), to choose by without reading the queries",
    )
    p.add_argument("--bits", default="16,32,64", help="comma-separated code lengths")
    p.add_argument("--seeds", type=int, default=3, help="runs per method and length: seeds 0..N-1")
    p.add_argument("--json", type=Path, help="write the results JSON here")
    p.add_argument("--plots", type=Path, help="write one precision-recall PNG per length here")
    p.add_argument(
        "--train-processes",
        type=int,
        default=1,
        help="AUCMH's k candidates trained at once, each in its own process (default 1; the "
        "same models bit for bit; 2 on 2 cores with OMP_NUM_THREADS=1)",
    )
    p.set_defaults(run=run)


def parse_bits(text: str) -> list[int]:
    """Code lengths from "16,32,64"; raises InputError unless each is an integer in 1..1024."""
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated integers for --bits, got {text!r}") from None
    if not bits or any(not 1 <= b <= 1024 for b in bits):
        raise InputError(f"expected code lengths in 1..1024, got {text!r}")
    return sorted(set(bits))


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, and write the JSON and plots when asked."""
    methods = parse_methods(args.methods)
    bits = parse_bits(args.bits)
    seeds = run_seeds(args.seeds)
    query_words = parse_query_words(args.query_words)
    scorings = [w.strip() for w in args.scoring.split(",") if w.strip()]
    if not scorings or any(w not in SCORINGS for w in scorings):
        raise InputError(f"expected --scoring from {', '.join(SCORINGS)}, got {args.scoring!r}")
    if args.train_processes < 1:
        raise InputError(f"expected --train-processes >= 1, got {args.train_processes}")
    data = prepare_from_args(args)
    if args.on == "validation":
        data = on_validation(data)
    sizes = data.split_sizes()
    print(f"{data.name}: {data.protocol}")
    print(f"queries {sizes['query']}, database {sizes['database']}, train {sizes['train']}")
    results = evaluate_methods(
        data,
        methods=methods,
        bits=bits,
        seeds=seeds,
        train_processes=args.train_processes,
        vocab_size=args.vocab_size,
        scorings=list(dict.fromkeys(scorings)),
        query_words=query_words,
    )
    print(format_table(results, dataset=data.name))
    print()
    print(format_other_metrics(results, dataset=data.name))
    words = format_words_table(results, dataset=data.name)
    if words:
        print()
        print(words)
    if args.json:
        document = results_document(
            results, dataset=data.name, n_query=sizes["query"], n_database=sizes["database"]
        )
        write_json(document, args.json)
        print(f"wrote {args.json}")
    if args.plots:
        for n_bits in bits:
            path = args.plots / f"{data.name}-{n_bits}bits-pr.png"
            plot_pr_curves(results, dataset=data.name, bits=n_bits, path=path)
            print(f"wrote {path}")
    return 0
