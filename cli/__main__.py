"""`python -m cli` is the same as the `cmh` console script."""

from cli.main import main

if __name__ == "__main__":  # not when a spawned worker process re-imports this module
    raise SystemExit(main())
