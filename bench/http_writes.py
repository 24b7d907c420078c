"""End to end through HTTP: a 1-item build (POST to job succeeded) and a 1-item delete against
`python -m cli serve` over N synthetic items, medians of several runs.

    .venv/bin/python -m bench.http_writes --artifacts artifacts --n 1000000

It copies the checkpoint from --artifacts into a temporary folder, fills a store with N items
(random codes, demo-like captions: bench.local.synthetic_artifacts), starts the
service on a free loopback port and times each write as a client sees it: the build from its
POST until GET /v1/jobs/{id} says succeeded (image decoding and encoding included), the delete
as one DELETE request. Also /healthz latency while 20 deletes run from 4 threads.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from bench.local import serving, synthetic_artifacts
from store.layout import CHECKPOINT_NAME


def png_b64(seed: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (seed * 37 % 255, 90, 160)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="holds model.pt")
    parser.add_argument("--n", type=int, default=1_000_000, help="items in the store")
    parser.add_argument("--repeats", type=int, default=7, help="timed writes of each kind")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "artifacts"
        synthetic_artifacts(args.artifacts / CHECKPOINT_NAME, target, n=args.n)
        with (
            serving(target, ready_timeout_s=300, CMH_LOG_LEVEL="WARNING") as url,
            httpx.Client(base_url=url, timeout=120) as client,
        ):
            builds, deletes = [], []
            for r in range(args.repeats + 1):  # the first of each warms the encoder up
                item = {"id": f"new-{r}", "text": "a red car on grass", "image_base64": png_b64(r)}
                start = time.perf_counter()
                job = client.post("/v1/index/build", json={"items": [item]}).json()["job_id"]
                while client.get(f"/v1/jobs/{job}").json()["status"] not in ("succeeded", "failed"):
                    time.sleep(0.001)
                builds.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                assert client.delete(f"/v1/items/{r}").status_code == 200
                deletes.append((time.perf_counter() - start) * 1000)

            def delete(i: int) -> None:
                client.delete(f"/v1/items/{1000 + i}")

            health = []
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(delete, i) for i in range(20)]
                while not all(f.done() for f in futures):
                    start = time.perf_counter()
                    client.get("/healthz")
                    health.append((time.perf_counter() - start) * 1000)
            stats = client.get("/v1/index/stats").json()
    result = {
        "n": args.n,
        "build_1_http_ms": statistics.median(builds[1:]),
        "delete_1_http_ms": statistics.median(deletes[1:]),
        "build_1_http_ms_all": builds[1:],
        "delete_1_http_ms_all": deletes[1:],
        "healthz_max_ms_during_20_deletes": max(health) if health else None,
        "items_after": stats["items"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
