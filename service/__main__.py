"""`python -m service` is the same as the `cmh` console script."""

from service.cli import main

raise SystemExit(main())
