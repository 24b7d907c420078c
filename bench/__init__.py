"""Benchmarks and test harnesses, apart from the library packages (as FAISS keeps benchs/ and
Lucene its benchmark module): `cmh bench index|mih|writes|service` runs index.py, writes.py,
milvus_writes.py and service.py; the others run as `python -m bench.NAME --help`. local.py
starts the service as a user does, in a child process, for the benchmarks and the tests."""
