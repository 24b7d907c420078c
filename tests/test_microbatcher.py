"""The micro-batcher on its own (service/encoder.py MicroBatcher), with the real backbone: requests
from many threads share backbone batches, each gets its own image's features, a failure reaches
every request of its batch, and close() finishes what was queued."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from models.features.image import (
    Backbone,
    cpu_cores,
    encode_images,
    fastest_lone_image_threads,
    load_backbone,
)
from service.encoder import MicroBatcher


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("efficientnet-lite0", device=torch.device("cpu"))


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def batcher(backbone: Backbone) -> Iterator[MicroBatcher]:
    made = MicroBatcher(backbone, window_ms=200.0, max_batch=8)
    yield made
    made.close()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_concurrent_requests_share_batches_and_get_their_own_features(
    backbone: Backbone, batcher: MicroBatcher
) -> None:
    pictures = images(12)
    alone = encode_images(backbone, pictures, batch_size=1)
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(12)

    def request(i: int) -> None:
        start.wait()
        results[i] = batcher.submit(pictures[i]).result(timeout=120)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(12))
    assert max(batcher.batch_sizes) > 1 and max(batcher.batch_sizes) <= 8  # shared, capped
    assert sum(batcher.batch_sizes) == 12
    for i in range(12):  # each request got its own image's features, not a neighbour's
        assert cosine(results[i], alone[i]) > 0.9999
        assert all(cosine(results[i], alone[j]) < 0.9999 for j in range(12) if j != i)


def test_a_lone_request_waits_at_most_the_window(backbone: Backbone) -> None:
    quick = MicroBatcher(backbone, window_ms=0.0, max_batch=32)
    try:
        feats = quick.submit(images(1)[0]).result(timeout=120)
        assert feats.shape == (backbone.dim,) and quick.batch_sizes == [1]
    finally:
        quick.close()


def test_a_failing_batch_fails_every_request_in_it(batcher: MicroBatcher) -> None:
    broken = Image.new("RGB", (0, 0))  # no pixels: preprocessing raises
    bad = batcher.submit(broken)
    with pytest.raises(Exception):  # noqa: B017 - whatever the backbone raises, passed through
        bad.result(timeout=120)
    good = batcher.submit(images(1)[0]).result(timeout=120)  # the worker is still alive
    assert np.isfinite(good).all()


def test_close_finishes_the_requests_already_queued(backbone: Backbone) -> None:
    slow = MicroBatcher(backbone, window_ms=50.0, max_batch=2)
    futures = [slow.submit(image) for image in images(5)]
    slow.close()
    assert all(f.done() and f.exception() is None for f in futures)


def test_the_worker_keeps_no_image_once_its_batch_is_answered(batcher: MicroBatcher) -> None:
    # The decode budget is released when a request has its features: an image the worker still
    # referenced while it waited for the next batch would sit in memory outside that budget.
    picture = images(1)[0]
    alive = weakref.ref(picture)
    batcher.submit(picture).result(timeout=120)
    del picture
    deadline = time.monotonic() + 10
    while alive() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert alive() is None, "the batcher still holds the image of an answered request"


def test_a_lone_request_is_not_held_for_the_window(backbone: Backbone) -> None:
    # A 2 s window: a lone client's request that waited it would take over 2 s (the next test
    # shows that requests with company do wait it).
    lone = MicroBatcher(backbone, window_ms=2000.0, max_batch=8)
    try:
        lone.submit(images(1)[0]).result(timeout=120)  # warm
        start = time.monotonic()
        lone.submit(images(1)[0]).result(timeout=120)
        took = time.monotonic() - start
    finally:
        lone.close()
    assert took < 2.0, f"{took:.2f} s"


def test_company_waits_the_window_and_shares_a_batch(backbone: Backbone) -> None:
    """Requests queued behind a running batch run together; after a shared batch the next
    request waits the window for company; after a lone batch it does not."""
    gate = threading.Event()

    def hold(_: int) -> None:
        gate.wait(60)

    mb = MicroBatcher(backbone, window_ms=2000.0, max_batch=8, on_batch=hold)
    pictures = images(5)
    try:
        first = mb.submit(pictures[0])  # runs at once, held in on_batch until the gate opens
        deadline = time.monotonic() + 30
        while not mb.batch_sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = [mb.submit(p) for p in pictures[1:3]]  # queued behind it: company
        gate.set()
        first.result(timeout=120)
        for f in queued:
            f.result(timeout=120)
        assert mb.batch_sizes == [1, 2]
        times = []
        for picture in pictures[3:]:
            start = time.monotonic()
            mb.submit(picture).result(timeout=120)
            times.append(time.monotonic() - start)
        assert mb.batch_sizes == [1, 2, 1, 1]
        assert times[0] >= 2.0 > times[1], times  # waited after the shared batch, not after 1
    finally:
        gate.set()
        mb.close()


def test_the_batcher_thread_runs_a_lone_image_on_the_faster_thread_count(
    backbone: Backbone,
) -> None:
    """1 thread or every core, timed on the thread that will run it; a given count is kept; the
    caller's threads are left alone, and the features do not depend on the choice."""
    cores = cpu_cores()
    before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def timed_here() -> None:
        seen["chosen"] = fastest_lone_image_threads(backbone, runs=2)
        seen["set"] = torch.get_num_threads()

    thread = threading.Thread(target=timed_here)
    thread.start()
    thread.join()
    assert seen["chosen"] in {1, cores} and seen["set"] == seen["chosen"]
    assert torch.get_num_threads() == before
    reference = load_backbone("efficientnet-lite0", device=torch.device("cpu"), fast=False)
    untimed = threading.Thread(
        target=lambda: seen.update(ref=fastest_lone_image_threads(reference))
    )
    untimed.start()
    untimed.join()
    assert seen["ref"] == cores  # not the fused network: every core, as before, untimed
    picture = images(1)[0]
    got = {}
    for threads in (None, 1):
        mb = MicroBatcher(backbone, window_ms=0.0, max_batch=8, lone_threads=threads)
        try:
            got[threads] = mb.submit(picture).result(timeout=120)
            assert mb.lone_threads in {1, cores} and (threads is None or mb.lone_threads == 1)
        finally:
            mb.close()
    np.testing.assert_allclose(got[None], got[1], rtol=1e-5, atol=1e-5)
