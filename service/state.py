"""What the lifespan loads, in one typed object that routes read through typed dependencies."""

from __future__ import annotations

from dataclasses import dataclass

from anyio import CapacityLimiter

from service.encoder import Encoder
from service.indexing import Indexer
from service.jobs import JobManager
from service.metrics import Metrics
from service.milvus_serving import MilvusMirror
from service.settings import Settings
from store.store import Searcher, Store


@dataclass(frozen=True)
class Loaded:
    """The served model, the store and the machinery around them."""

    settings: Settings  # the app's settings
    metrics: Metrics  # the app's Prometheus registry
    encoder: Encoder  # queries and build items to codes
    store: Store  # what is indexed
    indexer: Indexer  # build items into the store
    jobs: JobManager  # background builds
    mirror: MilvusMirror | None  # searches answered by Milvus, when configured
    text_searches: CapacityLimiter  # the threads text searches run on (settings.search_threads)

    def close(self) -> None:
        """Stop what runs in the background (the job worker after its job, the batcher), then
        close the mirror and the store."""
        self.jobs.close()
        self.encoder.close()
        if self.mirror is not None:
            self.mirror.close()
        self.store.close()

    @property
    def searcher(self) -> Searcher | None:
        """Who answers code searches: Milvus when configured, else the store's own view."""
        return None if self.mirror is None else self.mirror.search
