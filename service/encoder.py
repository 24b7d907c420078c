"""Queries to packed codes: texts through the BoW vectorizer, images through backbone + model.

A text becomes the columns of its known words, weighted as the checkpoint was trained (binary,
log counts or tf-idf with the checkpoint's idf: models/features/text.py, the same float32 values
the offline pipeline trains and evaluates on), and its code comes from
models/network/text_path.py: the text network as a sum of a few weight columns, in float64 NumPy,
with torch's codes bit for bit (torch itself encodes the rare text too close to a sign change, and
every text of a model that path cannot reproduce exactly).

Concurrent image requests are micro-batched: each request hands its decoded image to one worker
thread, which waits up to `window_ms` for more (at most `max_batch`) and runs the backbone once
for all of them. The window is waited only when there is company: another request already queued,
or a previous batch that was shared. A lone client's request runs at once, on the batcher's own
thread (no hand-off to a backbone worker): p50 45 -> 39 ms, while 8 clients still share batches
(bench/image_latency.py, docs/results/bench-image-latency.json).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.errors import InputError
from indexes.codes import pack_codes
from models.devices import resolve_device
from models.features.image import (
    Backbone,
    encode_images,
    fastest_lone_image_threads,
    load_backbone,
)
from models.features.query_words import QueryReader, QueryText
from models.features.text import TextVectorizer
from models.network.checkpoint import Checkpoint, load_checkpoint
from models.network.text_path import TextPath
from store.layout import CHECKPOINT_NAME
from store.manifest import Manifest, manifest_for

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    image: Image.Image
    future: Future[np.ndarray]


class MicroBatcher:
    """Runs backbone features for images submitted from many threads, in shared batches."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        window_ms: float,
        max_batch: int,
        on_batch: Callable[[int], None] | None = None,
        lone_threads: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.on_batch = on_batch
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        # torch threads of the batcher's thread, which runs a lone image inline: None times 1
        # against every core once when the thread starts and keeps the faster.
        self.lone_threads = lone_threads
        self.batch_sizes: list[int] = []  # recent batch sizes, for metrics and tests
        self._shared = False  # the previous batch had company: clients are arriving together
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="image-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: Image.Image) -> Future[np.ndarray]:
        """Queue one RGB image; the future resolves to its (dim,) float32 features."""
        future: Future[np.ndarray] = Future()
        self._queue.put(_Request(image, future))
        return future

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        # A batch of one runs here, on the thread count that is faster.
        if self.lone_threads is None:
            self.lone_threads = fastest_lone_image_threads(self.backbone)
        else:
            torch.set_num_threads(self.lone_threads)
        while True:
            batch, stop = self._next_batch()
            if batch:
                self._process(batch)
            # No reference to a finished batch may outlive it while this thread waits for the
            # next: its decoded images would stay in memory past the decode budget's release.
            del batch
            if stop:
                return

    def _next_batch(self) -> tuple[list[_Request], bool]:
        """The requests of the next batch and whether close() was called.

        After the first request, waits up to the window for more only when there is company
        (more already queued, or the previous batch was shared); otherwise it is a lone client.
        """
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        company = self._shared or not self._queue.empty()
        deadline = time.monotonic() + (self.window if company else 0.0)
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                nxt = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        self._shared = len(batch) > 1
        return batch, False

    def _process(self, batch: list[_Request]) -> None:
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
        if self.on_batch is not None:
            self.on_batch(len(batch))
        try:
            feats = encode_images(self.backbone, [r.image for r in batch], batch_size=len(batch))
        except Exception as err:  # handed to every waiting request, which re-raises it
            for r in batch:
                r.future.set_exception(err)
            return
        for r, f in zip(batch, feats, strict=True):
            r.future.set_result(f)


class Encoder:
    """The served model: texts and images to packed codes, with the vocabulary it was trained on."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        backbone: Backbone,
        *,
        window_ms: float,
        max_batch: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if checkpoint.vocabulary is None:
            raise InputError(
                "expected a checkpoint trained on bag-of-words text (with a vocabulary), got one "
                f"trained on {checkpoint.dataset}'s precomputed text features"
            )
        if checkpoint.image_backbone != backbone.name:
            raise InputError(
                f"expected the {checkpoint.image_backbone} backbone the checkpoint was trained on, "
                f"got {backbone.name}"
            )
        self.checkpoint = checkpoint
        # In eval mode since load_checkpoint; encoding never switches it, so threads share it.
        self.model = checkpoint.model
        self.n_bits = checkpoint.n_bits
        self.backbone = backbone
        self.vectorizer = TextVectorizer(
            checkpoint.vocabulary,
            weighting=checkpoint.text_weighting,
            idf=checkpoint.idf,
            tokens=checkpoint.text_tokens,
        )
        self.binary_text = checkpoint.text_weighting == "binary"  # columns alone: values are 1
        self.reader = QueryReader(self.vectorizer)  # query words, with their fallbacks
        # None: the model is not one the fast path reproduces exactly (logged once): torch.
        self.text_path = TextPath.from_model(self.model, weighted=not self.binary_text)
        self.batcher = MicroBatcher(
            backbone, window_ms=window_ms, max_batch=max_batch, on_batch=on_batch
        )

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(packed codes (n, words) uint64, (n,) bool: the text had no known word)."""
        values: list[np.ndarray] | None = None
        if self.binary_text:
            columns = self.vectorizer.columns(texts)
        else:
            columns, values = self.vectorizer.weighted(texts)
        unknown = np.fromiter((len(c) == 0 for c in columns), dtype=bool, count=len(columns))
        if self.text_path is None:
            dense = self.vectorizer.dense(columns, values)
            return pack_codes(self.model.encode_text(dense)), unknown
        return pack_codes(self.text_path.encode(columns, values)), unknown

    def read_query(self, text: str) -> QueryText:
        """The words of a query the model knows (after models/features/query_words.py's
        fallbacks) and those it ignores."""
        return self.reader.read(text)

    def encode_query(self, words: QueryText, *, real: bool) -> EncodedQuery:
        """One read query's packed code and, when `real`, its hash layer's real output."""
        columns = [words.columns]
        values = None if self.binary_text else [words.values]
        if self.text_path is not None:
            if not real:
                return EncodedQuery(pack_codes(self.text_path.encode(columns, values)), None)
            codes, output = self.text_path.encode_real(columns, values)
            return EncodedQuery(pack_codes(codes), output)
        dense = self.vectorizer.dense(columns, values)
        if not real:
            return EncodedQuery(pack_codes(self.model.encode_text(dense)), None)
        return self._real_output(dense, text=True)

    def encode_image_query(
        self, image: Image.Image, *, real: bool, timeout: float = 120.0
    ) -> EncodedQuery:
        """One image's packed code and, when `real`, its hash layer's real output."""
        features = self.batcher.submit(image).result(timeout=timeout)[None, :]
        if not real:
            return EncodedQuery(self.encode_image_features(features), None)
        return self._real_output(features, text=False)

    def _real_output(self, features: np.ndarray, *, text: bool) -> EncodedQuery:
        """The code and real output of the model's hash_text (or hash_image) with
        binary=False on one row of features: the code is its sign, as the binary pass gives."""
        hash_fn = self.model.hash_text if text else self.model.hash_image
        with torch.inference_mode():
            x = torch.as_tensor(features, dtype=torch.float32, device=self.model.image_mean.device)
            output = hash_fn(x, binary=False).double().cpu().numpy()
        return EncodedQuery(pack_codes(np.where(output > 0, 1, -1)), output)

    def encode_image(self, image: Image.Image, *, timeout: float = 120.0) -> np.ndarray:
        """(1, words) uint64 packed code of one image, through the micro-batcher."""
        features = self.batcher.submit(image).result(timeout=timeout)
        return self.encode_image_features(features[None, :])

    def encode_image_features(self, features: np.ndarray) -> np.ndarray:
        """(n, dim) backbone features -> (n, words) uint64 packed codes."""
        return pack_codes(self.model.encode_image(features))

    def image_features(self, images: list[Image.Image]) -> np.ndarray:
        """(n, dim) backbone features for a batch (offline builds; bypasses the batcher)."""
        return encode_images(self.backbone, images)

    def close(self) -> None:
        """Stop the batcher thread."""
        self.batcher.close()


@dataclass(frozen=True)
class EncodedQuery:
    """A query's packed code and, for asymmetric scoring, the real output it is the sign of."""

    code: np.ndarray  # (1, n_words) uint64
    real: np.ndarray | None  # (1, n_bits) float64: tanh outputs, L2-normalised (before sign)


@dataclass(frozen=True)
class ServedModel:
    """An artifacts folder's checkpoint, its backbone, and the manifest its codes must carry."""

    checkpoint: Checkpoint
    backbone: Backbone
    manifest: Manifest


def load_served_model(
    folder: Path, *, device: str, backbone: Backbone | None = None
) -> ServedModel:
    """Load FOLDER/model.pt and the backbone it was trained with on `device` (auto/cpu/cuda);
    `backbone`: one already loaded, used when it is the one the checkpoint names (a version
    switch keeps one backbone in memory)."""
    checkpoint_path = folder / CHECKPOINT_NAME
    torch_device = resolve_device(device)
    checkpoint = load_checkpoint(checkpoint_path, device=str(torch_device))
    if backbone is None or backbone.name != checkpoint.image_backbone:
        backbone = load_backbone(checkpoint.image_backbone, device=torch_device)
    manifest = manifest_for(
        checkpoint_path,
        n_bits=checkpoint.n_bits,
        backbone=checkpoint.image_backbone,
        vocabulary=checkpoint.vocabulary,
    )
    return ServedModel(checkpoint, backbone, manifest)
