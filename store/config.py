"""StoreConfig: the store's tuning knobs in one object (as Lucene's IndexWriterConfig), passed to
Store.open / Store.create (and open_store); the compactor and the filter index read the store's.

None of them changes what a store holds or answers, only what its writes, merges, filtered
searches and memory cost; a store opened with other values reads the same files. The defaults are
what `cmh serve` and `cmh index build` use; the tests pass small ones to reach seals, bulk
segments and merges with a few hundred rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from indexes.hamming import SPLIT_MIN_WORDS


@dataclass(frozen=True)
class StoreConfig:
    """How a store seals, merges, answers filters and reads at open (see each field)."""

    # The growing part (rows in SQLite and in memory) is sealed into a segment file at this size.
    seal_rows: int = 65_536
    # A batch at least this large is written straight as its own segment.
    bulk_rows: int = 16_384
    # This many adjacent segments of one size level merge into one of the next (LogMergePolicy).
    merge_factor: int = 8
    # A segment with more than this fraction of its rows deleted is rewritten.
    dead_fraction: float = 0.2
    # When at most 1 / gather_ratio of a part's rows pass a filter, only their codes are scanned.
    gather_ratio: int = 32
    # Filter posting lists and segments' filter rows kept in memory (two LRUs), in bytes.
    posting_cache_bytes: int = 256 << 20
    selection_cache_bytes: int = 128 << 20
    # search_now declines a scan of this many uint64 words of codes or more (16 MiB, where the
    # index starts to split one query over threads): the caller's thread would be held for
    # milliseconds. At 10M 64-bit items (80 MB, about 5 ms a scan) searches run in the event loop
    # gave a p99 of 0.9-1.2 s at 32 connections against 0.16-0.2 s on worker threads.
    inline_max_words: int = SPLIT_MIN_WORDS
    # Rows read at a time while opening a store of an older schema fills its terms table.
    upgrade_rows: int = 50_000


DEFAULT_CONFIG = StoreConfig()  # what cmh serve and cmh index build open their stores with
