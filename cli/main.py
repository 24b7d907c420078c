"""The `cmh` command line (also `python -m cli`): one subcommand per module of this package.

Errors: an InputError prints one line to stderr and exits 2; anything else is a bug and prints
its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from common.errors import InputError, IntegrityError

# One module of this package per subcommand: it adds its subparsers with `register(subparsers)`
# and sets `run=` on them. Only the module of the command being run is imported (as pip loads
# its commands), so that `cmh serve` loads neither training nor benchmark code.
COMMANDS = ("data", "demo", "evaluate", "features", "train", "index", "serve", "bench")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with the subcommand that argv names, or with every one (argv None,
    or naming none: `cmh --help` lists them all)."""
    parser = argparse.ArgumentParser(
        prog="cmh", description="AUCMH cross-modal hashing: data, features, training, search."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    named = _named_command(argv) if argv is not None else None
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in (named,) if named is not None else COMMANDS:
        importlib.import_module(f"cli.{name}").register(subparsers)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand argv names (its first positional argument), if it is one of COMMANDS."""
    first = argparse.ArgumentParser(prog="cmh", add_help=False)
    first.add_argument("--log-level")
    first.add_argument("command", nargs="?")
    known, _ = first.parse_known_args(argv)
    command: str | None = known.command
    return command if command in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen subcommand and return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
