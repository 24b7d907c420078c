"""The baselines: code shape and values, training-only statistics, and better than random."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import InputError
from evaluation.metrics import (
    average_precisions,
    cosine_distances,
    hamming_distances,
    relevance,
)
from models.methods.baselines import (
    CCA,
    CCAITQ,
    CMFH,
    CVH,
    LSH,
    FitCache,
    cca_directions,
    itq_rotation,
)

BINARY = (CVH, CMFH, CCAITQ, LSH)


def separable_pairs(
    n: int, *, n_classes: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (n, 20), text (n, 8), one-hot labels): both modalities views of one class latent."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(scale=3.0, size=(n_classes, 6))
    to_image = np.random.default_rng(101).normal(size=(6, 20))
    to_text = np.random.default_rng(102).normal(size=(6, 8))
    classes = rng.integers(0, n_classes, size=n)
    latent = centres[classes] + rng.normal(size=(n, 6))
    image = latent @ to_image + 0.5 * rng.normal(size=(n, 20)) + 5.0  # off-centre on purpose
    text = latent @ to_text + 0.5 * rng.normal(size=(n, 8)) - 2.0
    return image, text, np.eye(n_classes, dtype=np.uint8)[classes]


@pytest.fixture(scope="module")
def split() -> dict[str, np.ndarray]:
    image, text, labels = separable_pairs(500)
    return {
        "image_train": image[:400],
        "text_train": text[:400],
        "labels_train": labels[:400],
        "image_query": image[400:],
        "text_query": text[400:],
        "labels_query": labels[400:],
    }


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
@pytest.mark.parametrize("n_bits", [8, 16, 32])
def test_codes_are_int8_signs_of_the_right_length(
    split: dict[str, np.ndarray], method: type[CVH], n_bits: int
) -> None:
    model = method().fit(split["image_train"], split["text_train"], n_bits=n_bits, seed=0)
    for codes in (model.encode_image(split["image_query"]), model.encode_text(split["text_query"])):
        assert codes.dtype == np.int8
        assert codes.shape == (100, n_bits)
        assert set(np.unique(codes)) <= {-1, 1}


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
def test_every_baseline_beats_random_in_both_directions(
    split: dict[str, np.ndarray], method: type[CVH]
) -> None:
    model = method().fit(split["image_train"], split["text_train"], n_bits=16, seed=0)
    db_image = model.encode_image(split["image_train"])
    db_text = model.encode_text(split["text_train"])
    q_image = model.encode_image(split["image_query"])
    q_text = model.encode_text(split["text_query"])
    labels_q, labels_db = split["labels_query"], split["labels_train"]
    rng = np.random.default_rng(7)
    rel = relevance(labels_q, labels_db)
    random_codes = (
        np.where(rng.random((100, 16)) > 0.5, 1, -1),
        np.where(rng.random((400, 16)) > 0.5, 1, -1),
    )
    random_map = np.mean(average_precisions(hamming_distances(*random_codes), rel))
    i2t = np.mean(average_precisions(hamming_distances(q_image, db_text), rel))
    t2i = np.mean(average_precisions(hamming_distances(q_text, db_image), rel))
    assert random_map < 0.35  # four balanced classes: about 0.25
    assert i2t > random_map + 0.2
    assert t2i > random_map + 0.2


def test_real_valued_cca_beats_random(split: dict[str, np.ndarray]) -> None:
    cca = CCA().fit(split["image_train"], split["text_train"])
    rel = relevance(split["labels_query"], split["labels_train"])
    i2t = cosine_distances(
        cca.embed_image(split["image_query"]), cca.embed_text(split["text_train"])
    )
    assert np.mean(average_precisions(i2t, rel)) > 0.6


@pytest.mark.parametrize("method", BINARY, ids=lambda m: m.__name__)
def test_encoding_uses_training_statistics_only(
    split: dict[str, np.ndarray], method: type[CVH]
) -> None:
    # Same seed, same codes; and a row's code does not depend on the batch it is encoded in.
    a = method().fit(split["image_train"], split["text_train"], n_bits=16, seed=3)
    b = method().fit(split["image_train"], split["text_train"], n_bits=16, seed=3)
    batch = a.encode_image(split["image_query"])
    assert np.array_equal(batch, b.encode_image(split["image_query"]))
    assert np.array_equal(batch[:1], a.encode_image(split["image_query"][:1]))
    assert np.array_equal(
        a.encode_text(split["text_query"][5:6]), a.encode_text(split["text_query"])[5:6]
    )


def test_more_bits_than_shared_dimensions(split: dict[str, np.ndarray]) -> None:
    # The text is 8-d, so CCA has at most 8 directions; 32 bits must still be 32 usable bits.
    for method in (CVH, CCAITQ, LSH):
        model = method().fit(split["image_train"], split["text_train"], n_bits=32, seed=0)
        codes = model.encode_text(split["text_query"])
        assert codes.shape == (100, 32)
        assert np.all(codes.std(axis=0) > 0)  # no constant bit


def test_cca_finds_the_shared_direction() -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(1000, 1))
    x = np.hstack([shared, rng.normal(size=(1000, 3))])
    y = np.hstack([rng.normal(size=(1000, 2)), -2.0 * shared])
    a, b, corr = cca_directions(x - x.mean(0), y - y.mean(0), n_components=3)
    assert a.shape == (4, 3) and b.shape == (3, 3)
    assert corr[0] > 0.99 and np.all(np.diff(corr) <= 0)
    assert abs(a[0, 0]) > 10 * np.abs(a[1:, 0]).max()
    assert abs(b[2, 0]) > 10 * np.abs(b[:2, 0]).max()


def test_itq_rotation_is_orthogonal_and_lowers_quantisation_loss() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    v -= v.mean(axis=0)
    r = itq_rotation(v, iterations=50, rng=np.random.default_rng(1))
    assert np.allclose(r @ r.T, np.eye(8), atol=1e-8)
    start, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((8, 8)))

    def loss(rot: np.ndarray) -> float:
        z = v @ rot
        return float(np.sum((np.where(z >= 0, 1.0, -1.0) - z) ** 2))

    assert loss(r) < loss(start)


def test_bad_inputs_raise_input_error(split: dict[str, np.ndarray]) -> None:
    with pytest.raises(InputError, match="paired rows"):
        CVH().fit(split["image_train"], split["text_train"][:10], n_bits=16, seed=0)
    with pytest.raises(InputError, match="n_bits >= 1"):
        LSH().fit(split["image_train"], split["text_train"], n_bits=0, seed=0)
    model = CMFH().fit(split["image_train"], split["text_train"], n_bits=8, seed=0)
    with pytest.raises(InputError, match=r"image features of shape \(n, 20\)"):
        model.encode_image(split["text_query"])


def test_fit_cache_gives_bit_identical_codes_and_is_keyed_by_content() -> None:
    rng = np.random.default_rng(11)
    image, text = rng.normal(size=(120, 12)), rng.normal(size=(120, 6))
    cache = FitCache()
    for fit in (
        lambda c, r: CVH(ridge=r).fit(image, text, n_bits=8, seed=0, cache=c),
        lambda c, r: LSH(ridge=r).fit(image, text, n_bits=8, seed=1, cache=c),
        lambda c, r: CCAITQ(ridge=r).fit(image, text, n_bits=16, seed=2, cache=c),
        lambda c, r: CMFH(gamma=r).fit(image, text, n_bits=8, seed=0, cache=c),
    ):
        for ridge in (0.01, 1.0):
            plain, cached = fit(None, ridge), fit(cache, ridge)
            assert np.array_equal(plain.encode_image(image), cached.encode_image(image))
            assert np.array_equal(plain.encode_text(text), cached.encode_text(text))
    assert cache.hits > 0  # CVH, LSH and CCA-ITQ share CCA's covariances and directions
    # Other rows are another key: the fit matches a fresh uncached fit on those rows.
    other = image.copy()
    other[0, 0] += 1.0
    cached = CVH().fit(other, text, n_bits=8, seed=0, cache=cache)
    plain = CVH().fit(other, text, n_bits=8, seed=0)
    assert np.array_equal(plain.encode_image(other), cached.encode_image(other))
