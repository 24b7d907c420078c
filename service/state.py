"""What the lifespan loads, in one typed object that routes read through typed dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from anyio import CapacityLimiter

from service.encoder import Encoder
from service.indexing import Indexer
from service.jobs import JobManager
from service.metrics import Metrics
from service.settings import Settings
from service.suggestions import Suggestions
from store.backend import ItemStore


@dataclass(frozen=True)
class Loaded:
    """One version's model and store (store/versions.py), and the machinery around them; the
    job manager and the search threads are the same object in every version of a process."""

    version: str  # its name: "v1", "v2", ...
    settings: Settings  # the app's settings
    metrics: Metrics  # the app's Prometheus registry
    encoder: Encoder  # queries and build items to codes
    store: ItemStore  # what is indexed: the local Store, or MilvusStore (CMH_INDEX_BACKEND)
    indexer: Indexer  # build items into the store
    jobs: JobManager  # background builds
    # The threads filtered text searches, and those that would wait, run on (search_threads).
    text_searches: CapacityLimiter
    suggestions: Suggestions  # words for the page's "Try:" row

    def close(self) -> None:
        """Stop the batcher, then close the store (the jobs outlive a version: Serving.close)."""
        self.encoder.close()
        self.store.close()
