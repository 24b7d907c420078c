"""Server memory under concurrent near-limit image searches, this tree against a named peer tree.

    .venv/bin/python -m bench.decode_memory --artifacts artifacts --peer /tmp/old-tree

Each run starts `python -m cli serve` from one source tree (this one, or --peer: another
checkout, e.g. the commit before the decode budget) over a copy of --artifacts, sends CONCURRENT
image searches at once, each a PNG of about 39.6 M pixels (a few hundred KB on the wire), then
one small image search, and reads the server's /proc/PID/status: VmRSS when ready (`ready_mb`),
VmHWM, the peak, after the burst (`peak_mb`), VmRSS after the burst (`after_mb`) and after the
small search (`settled_mb`). Runs alternate between the trees (peer, this, peer, ...); the
medians are printed side by side with their ratio and written as JSON:
{"this": {key: median}, "peer": {key: median}, "runs": [{"tree", key: value...}], "repeats"}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from bench.local import free_port

CONCURRENT = 8
SIZE = (6300, 6286)  # 39.6 M pixels, under the default 40 M limit
KEYS = ("ready_mb", "peak_mb", "after_mb", "settled_mb")
THIS_TREE = Path(__file__).resolve().parents[1]


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def status_mb(pid: int, field: str) -> float:
    """A Vm* field of /proc/PID/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def one_run(tree: Path, artifacts: Path, images: list[bytes], small: bytes) -> dict[str, float]:
    """Serve a copy of artifacts from `tree`, send the burst, and read the server's memory."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copytree(artifacts, Path(tmp) / "artifacts"))
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "cli", "serve", "--artifacts", str(copy)]
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=url, timeout=600) as client:
                deadline = time.monotonic() + 300
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server from {tree} did not come up")
                    time.sleep(0.5)
                ready = status_mb(proc.pid, "VmRSS")

                def search(data: bytes) -> int:
                    files = {"file": ("big.png", data, "image/png")}
                    return client.post("/v1/search/image", files=files, data={"k": "1"}).status_code

                with ThreadPoolExecutor(len(images)) as pool:
                    codes = list(pool.map(search, images))
                if set(codes) != {200}:
                    raise RuntimeError(f"expected every search to answer 200, got {codes}")
                time.sleep(1.0)
                peak, after = status_mb(proc.pid, "VmHWM"), status_mb(proc.pid, "VmRSS")
                if search(small) != 200:
                    raise RuntimeError("the small search failed")
                time.sleep(1.0)
                settled = status_mb(proc.pid, "VmRSS")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"ready_mb": ready, "peak_mb": peak, "after_mb": after, "settled_mb": settled}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="a served artifacts folder")
    parser.add_argument("--peer", type=Path, required=True, help="the source tree to compare")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tree")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    images = [png(SIZE, (i * 30, 200 - i * 20, 90)) for i in range(CONCURRENT)]
    small = png((320, 240), (10, 120, 200))
    runs: list[dict[str, float | str]] = []
    for _ in range(args.repeats):
        for name, tree in (("peer", args.peer.resolve()), ("this", THIS_TREE)):
            figures = one_run(tree, args.artifacts, images, small)
            runs.append({"tree": name, **figures})
            print(name, " ".join(f"{k}={v:.0f}" for k, v in figures.items()), flush=True)
    medians = {
        name: {k: statistics.median(float(r[k]) for r in runs if r["tree"] == name) for k in KEYS}
        for name in ("this", "peer")
    }
    print(f"{CONCURRENT} concurrent {SIZE[0]}x{SIZE[1]} PNG searches, medians of {args.repeats}")
    print(f"{'':12} {'peer':>8} {'this':>8} {'this/peer':>10}")
    for k in KEYS:
        peer, this = medians["peer"][k], medians["this"][k]
        print(f"{k:12} {peer:8.0f} {this:8.0f} {this / peer:10.2f}")
    if args.json is not None:
        out = {**medians, "runs": runs, "repeats": args.repeats}
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
