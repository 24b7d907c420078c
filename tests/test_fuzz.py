"""A bounded fuzz run that stays in the suite: schemathesis, every check, a fixed seed, against
a real `python -m cli serve` process over the demo artifacts (with an API key).

Zero failures means no 5xx, no response that breaks the OpenAPI schema (status, content type,
headers, body), 405s with a correct Allow header, every schema-invalid request refused, every
schema-valid one accepted, and the key required where the schema says so. Two answers are
expected of schema-valid requests besides the usual ones, and configured so below: a 400 for an
image upload whose bytes are no image, and for a build naming a dataset root or an image that
does not exist (no schema can say which bytes decode or which folders exist).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.local import serving

SEED = 15
MAX_EXAMPLES = 40  # per operation: about 30 s on a 2-core machine
KEY = "fuzz-key"
CONFIG = """
[[operations]]
include-path = "/v1/index/build"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 404, 429]

[[operations]]
include-path = "/v1/search/image"
checks.positive_data_acceptance.expected-statuses = ["2xx", 400, 401, 404]
"""


def test_schemathesis_finds_no_failure(demo_artifacts: Path, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with serving(demo_artifacts, CMH_API_KEY=KEY, CMH_SERVER_DATA_DIR=str(demo_artifacts)) as url:
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                "from schemathesis.cli import schemathesis; schemathesis()",
                "--no-color",
                "--config-file",
                str(config),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--seed",
                str(SEED),
                "--max-examples",
                str(MAX_EXAMPLES),
                "--workers",
                "1",
                "--generation-database",
                "none",
                "--header",
                f"X-API-Key: {KEY}",
            ],
            cwd=tmp_path,
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or " passed" in run.stdout, run.stdout[-3000:]
