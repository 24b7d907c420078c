"""The floor of `cmh bench service`: the framework alone, what a text search cannot beat.

The same FastAPI and uvicorn as `cmh serve` (httptools, uvloop, gc.freeze after loading), the
same request and response models (a TextSearch body in, a SearchResponse of k hits with demo
captions out), and no work: no model, no index, no store. Never part of the served app.

    python -m bench.floor --port 8001
"""

from __future__ import annotations

import argparse
import gc

import uvicorn
from fastapi import FastAPI

from service.schemas import Hit, SearchResponse, TextSearch

# Ten hits shaped like the service's: int ids, distances, demo-like captions, image URLs.
CAPTIONS = (
    "a large red car on the left, on green grass",
    "a small blue boat in the middle and a large yellow sun at the top, by the sea",
    "a small green tree on the right, under a blue sky",
    "a large white moon at the top, in the night",
    "a small pink flower at the bottom and a large purple balloon on the left, at sunset",
    "a large orange fish in the middle, by the sea",
    "a small black house on the right, on green grass",
    "a large yellow star at the top and a small red car at the bottom, in the night",
    "a small white boat on the left, at sunset",
    "a large green tree in the middle, under a blue sky",
)
HITS = [
    Hit(
        id=i,
        distance=20 + i,
        score=1 - (20 + i) / 32,
        text=text,
        image_url=f"/v1/items/{i}/image",
        fields={},
    )
    for i, text in enumerate(CAPTIONS)
]


def create_floor_app() -> FastAPI:
    """POST /v1/search/text answering k canned hits (at most 10), and GET /readyz."""
    app = FastAPI(title="cmh bench floor", docs_url=None, redoc_url=None)

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/search/text")
    async def search_text(body: TextSearch) -> SearchResponse:
        return SearchResponse(
            target=body.target,
            k=body.k,
            scoring=body.scoring,
            n_bits=64,
            commit="1",
            used_words=body.text.split()[:3],
            unknown_words=[],
            hits=HITS[: body.k],
        )

    return app


def main() -> int:
    """Serve the floor on loopback until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on")
    parser.add_argument("--log-level", default="warning", help="uvicorn's logging level")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    args = parser.parse_args()
    options = {
        "host": args.host,
        "port": args.port,
        "http": "httptools",
        "loop": "uvloop",
        "log_level": args.log_level,
    }
    if args.workers == 1:
        uvicorn.run(create_frozen_floor_app(), **options)
    else:  # as `cmh serve --workers N`: uvicorn calls the factory in each worker
        uvicorn.run(
            "bench.floor:create_frozen_floor_app", factory=True, workers=args.workers, **options
        )
    return 0


def create_frozen_floor_app() -> FastAPI:
    """The floor with what is loaded kept out of the cyclic collector, as `cmh serve` does."""
    app = create_floor_app()
    gc.freeze()
    return app


if __name__ == "__main__":
    raise SystemExit(main())
