"""The `cmh` command line: one module per subcommand (each has `register(subparsers)` and a
`run(args) -> int`), the offline builds they run (the demo, `cmh bench service` and its floor
app). Nothing imports this package but its entry point and the tests."""
