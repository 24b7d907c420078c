"""`python -m cli` is the same as the `cmh` console script."""

from cli.main import main

raise SystemExit(main())
