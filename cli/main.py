"""The `cmh` command line (also `python -m cli`): one subcommand per module of this package.

Errors: an InputError prints one line to stderr and exits 2; anything else is a bug and prints
its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from cli import bench, data, demo, evaluate, features, index, serve, train
from common.errors import InputError, IntegrityError

# Each module adds its own subparsers with `register(subparsers)` and sets `run=` on them.
COMMANDS = (data, demo, evaluate, features, train, index, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cmh", description="AUCMH cross-modal hashing: data, features, training, search."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen subcommand and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        with logging_redirect_tqdm():
            code: int = args.run(args)
    except (InputError, IntegrityError) as err:  # bad input, or stored data that fails a check
        print(f"cmh {args.command}: error: {err}", file=sys.stderr)
        return 2
    return code
