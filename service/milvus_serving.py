"""Serving index generations from Milvus (settings: CMH_INDEX_BACKEND=milvus, CMH_MILVUS_URI).

The generation files under artifacts/index/ stay the record (written and swapped as with the
in-memory backend); each generation is mirrored into two Milvus collections, which then answer
the searches, so the codes need not stay in the API process's memory between builds. The
collections of the served generation and of the one before it are kept (a search that started
before a swap may still be reading the older one); older ones are dropped.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from indexes.hamming import HammingIndex
from indexes.milvus import MilvusHammingIndex
from service.store import INDEX_DIR, Snapshot

logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")


def collection_name(generation: str, modality: str) -> str:
    """Milvus names take letters, digits and underscores."""
    return f"cmh_{generation.replace('-', '_')}_{modality}"


def in_memory(index: HammingIndex | MilvusHammingIndex) -> HammingIndex:
    """A HammingIndex with the same ids, codes and order (what a build extends)."""
    if isinstance(index, HammingIndex):
        return index.copy()
    copy = HammingIndex(index.n_bits)
    copy.add(index.codes, index.ids)
    return copy


class MilvusMirror:
    """Fills, opens and drops the Milvus collections of index generations."""

    def __init__(self, *, artifacts: Path, uri: str, token: str = "") -> None:
        self.artifacts = artifacts
        self.uri = uri
        self.token = token
        self._served: list[Snapshot] = []  # the last two served, newest last

    def serve(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot with Milvus indexes of the same codes (collections reused or filled)."""
        if snapshot.generation == "empty":  # nothing built yet: nothing to mirror
            return snapshot
        folder = self.artifacts / INDEX_DIR / snapshot.generation
        served = {}
        for modality in MODALITIES:
            memory = getattr(snapshot, f"{modality}_index")
            name = collection_name(snapshot.generation, modality)
            index = MilvusHammingIndex(
                snapshot.manifest.n_bits, uri=self.uri, collection=name, token=self.token
            )
            if len(index) != len(memory):  # new, or left half-filled by a crash: fill it again
                index.drop()
                index = MilvusHammingIndex.load(
                    folder / f"{modality}.hidx", uri=self.uri, collection=name, token=self.token
                )
            served[modality] = index
        logger.info("generation %s served from Milvus at %s", snapshot.generation, self.uri)
        mirrored = replace(snapshot, image_index=served["image"], text_index=served["text"])
        self._served.append(mirrored)
        for old in self._served[:-2]:
            for retired in (old.image_index, old.text_index):
                if isinstance(retired, MilvusHammingIndex):
                    retired.drop()
        self._served = self._served[-2:]
        return mirrored
