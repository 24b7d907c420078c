"""One module per `cmh` subcommand; each has `register(subparsers)` and a `run(args) -> int`."""
