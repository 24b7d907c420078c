"""What is indexed: the one writer of index files, used by the service and the CLI alike.

Lucene's design at small scale (see store/store.py): codes live in immutable, checksummed,
memory-mapped segment files plus a growing part; deletes are tombstones; metadata and the list of
live segments are committed together in one SQLite transaction (WAL, synchronous=FULL), which is
the commit point; background compaction merges small segments and drops deleted rows.
"""
