"""The fast text path (models/network/text_path.py) gives torch's codes bit for bit.

Against `HashingModel.encode_text` on the dense bag of words: the demo checkpoint built by
build_demo, a model trained here on real Web News captions (2,000 words), and untrained models of
other shapes (l2 scaling, two hidden layers, no dropout); on thousands of random word mixes, real
captions, texts with no known word, one by one and in batches. The vectorizer's columns are
scikit-learn's CountVectorizer output for the same analyzer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import CountVectorizer
from torch import nn

from indexes.codes import pack_codes
from models.data.webnews import load_web_news
from models.features.image import load_backbone
from models.features.text import TextVectorizer, tokenize
from models.network.aucmh import HashingModel
from models.network.checkpoint import load_checkpoint
from models.network.text_path import FLOOR, TextPath
from models.training.train import TrainConfig, train
from service.encoder import Encoder

WebNewsModel = tuple[HashingModel, TextVectorizer, list[str]]  # model, its vectorizer, captions
NOISE = ["zebra", "xylophone", "!!", "42", "The", "Ünïcode", "彩色", "。", "don't"]


def _random_texts(rng: np.random.Generator, vocabulary: list[str], count: int) -> list[str]:
    """Mixes of 0-30 vocabulary words, unknown words and punctuation, in random case."""
    words = np.array(vocabulary + NOISE, dtype=object)
    out = []
    for size in rng.integers(0, 31, size=count):
        picked = [str(w) for w in rng.choice(words, size=size)]
        out.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in picked))
    return out


def _random_columns(rng: np.random.Generator, dim: int, count: int) -> list[np.ndarray]:
    """Sorted distinct column sets of 0..min(dim, 80) words, the first one empty."""
    sizes = rng.integers(0, min(dim, 80) + 1, size=count)
    sizes[0] = 0
    return [np.sort(rng.choice(dim, size=s, replace=False)).astype(np.intp) for s in sizes]


def _dense(columns: list[np.ndarray], dim: int) -> np.ndarray:
    dense = np.zeros((len(columns), dim), dtype=np.float32)
    for row, cols in zip(dense, columns, strict=True):
        row[cols] = 1.0
    return dense


def _torch_z(model: HashingModel, dense: np.ndarray) -> np.ndarray:
    """Torch's own float32 pre-hash outputs, as float64."""
    with torch.inference_mode():
        z = model.text_net(model.standardise_text(torch.as_tensor(dense)))
    out: np.ndarray = z.double().numpy()
    return out


def _assert_codes_equal(model: HashingModel, columns: list[np.ndarray]) -> TextPath:
    """The fast path's codes equal torch's, in one batch and one text at a time, and torch's
    float32 outputs stay within a 20th of the margin (batched and single)."""
    path = TextPath.from_model(model)
    assert path is not None
    dense = _dense(columns, model.text_dim)
    expected = model.encode_text(dense)
    assert np.array_equal(path.encode(columns), expected)
    logits = path.logits(columns)
    assert (np.abs(_torch_z(model, dense) - logits.z) <= logits.margin / 20).all()
    for i in range(0, len(columns), max(1, len(columns) // 200)):  # ~200 single-text calls
        one = dense[i : i + 1]
        assert np.array_equal(path.encode([columns[i]]), model.encode_text(one))
        assert (np.abs(_torch_z(model, one) - logits.z[i]) <= logits.margin[i] / 20).all()
    return path


def _certain_share(path: TextPath, columns: list[np.ndarray]) -> float:
    return float(1.0 - path.logits(columns).uncertain().mean())


@pytest.fixture(scope="module")
def web_news_model(web_news_root: Path) -> WebNewsModel:
    """AUCMH trained for 2 epochs on Web News captions (2,000 words; random image features)."""
    data = load_web_news(web_news_root)
    assert data.texts is not None
    captions = list(data.texts)
    vectorizer = TextVectorizer.fit([captions[i] for i in data.train_idx], vocab_size=2000)
    text, _ = vectorizer.transform(captions)
    image = np.random.default_rng(0).standard_normal((len(data), 32)).astype(np.float32)
    data = data.with_features(
        image=image, text=text, image_backbone="random", vocabulary=vectorizer.vocabulary
    )
    cfg = TrainConfig(epochs=2, image_hidden=(64,), n_anchors=512, device="cpu")
    model, _ = train(cfg=cfg, data=data)
    return model, vectorizer, captions


def test_columns_are_count_vectorizers_ones(
    web_news_model: WebNewsModel, rng: np.random.Generator
) -> None:
    _, vectorizer, captions = web_news_model
    texts = captions[:500] + _random_texts(rng, vectorizer.vocabulary, 300) + ["", "!!", "zebra"]
    sklearn = CountVectorizer(
        analyzer=lambda t: tokenize(t, "auto"),
        vocabulary=vectorizer.vocabulary,
        binary=True,
        dtype=np.float32,
    )
    expected = sklearn.transform(texts).toarray()
    features, unknown = vectorizer.transform(texts)
    assert features.dtype == np.float32 and np.array_equal(features, expected)
    assert np.array_equal(unknown, expected.sum(axis=1) == 0)
    for cols, row in zip(vectorizer.columns(texts), expected, strict=True):
        assert cols.dtype == np.intp and cols.tolist() == np.flatnonzero(row).tolist()


def test_a_repeated_vocabulary_word_is_refused() -> None:
    with pytest.raises(Exception, match="distinct words, got 'car' twice"):
        TextVectorizer(["car", "boat", "car"])


def test_codes_equal_torch_on_web_news(
    web_news_model: WebNewsModel, rng: np.random.Generator
) -> None:
    model, vectorizer, captions = web_news_model
    texts = captions + _random_texts(rng, vectorizer.vocabulary, 500) + ["", "zebra !!"]
    columns = vectorizer.columns(texts) + _random_columns(rng, model.text_dim, 3000)
    path = _assert_codes_equal(model, columns)
    # The fast path decides nearly every text (torch only the few near a sign change; a model
    # trained 2 epochs has more of them than the full ones: 0.4 % of captions there).
    assert _certain_share(path, columns[: len(captions)]) > 0.95
    assert _certain_share(path, columns) > 0.95


def test_codes_equal_torch_on_the_demo_checkpoint(
    demo_artifacts_master: Path, rng: np.random.Generator
) -> None:
    checkpoint = load_checkpoint(demo_artifacts_master / "model.pt")
    assert checkpoint.vocabulary is not None
    vectorizer = TextVectorizer(checkpoint.vocabulary)
    lines = (demo_artifacts_master / "demo" / "captions.jsonl").read_text().splitlines()
    captions = [json.loads(line)["caption"] for line in lines]
    texts = captions + _random_texts(rng, checkpoint.vocabulary, 3000) + ["", "nothing known"]
    columns = vectorizer.columns(texts) + _random_columns(rng, checkpoint.model.text_dim, 2000)
    path = _assert_codes_equal(checkpoint.model, columns)
    assert _certain_share(path, columns) > 0.98


@pytest.mark.parametrize(
    ("input_norm", "hidden", "dropout"),
    [("l2", (512,), 0.3), ("zscore", (256, 128), 0.0), ("l2", (64, 64, 32), 0.5)],
)
def test_codes_equal_torch_for_other_shapes(
    input_norm: str, hidden: tuple[int, ...], dropout: float, rng: np.random.Generator
) -> None:
    torch.manual_seed(0)
    model = HashingModel(
        image_dim=8, text_dim=300, n_bits=32, image_hidden=(8,), text_hidden=hidden,
        input_norm=input_norm, dropout=dropout,
    )  # fmt: skip
    bow = (rng.random((500, 300)) < 0.03).astype(np.float32)
    model.fit_statistics(rng.standard_normal((500, 8)).astype(np.float32), bow)
    model.eval()
    columns = _random_columns(rng, 300, 3000) + [np.arange(300, dtype=np.intp)]
    path = _assert_codes_equal(model, columns)
    assert _certain_share(path, columns) > 0.95


def test_a_sign_float32_loses_goes_to_torch() -> None:
    """z = 1e-30 * 1e-20: float64 keeps it (+1), float32 rounds the product to 0 (-1)."""
    model = HashingModel(
        image_dim=1, text_dim=2, n_bits=16, image_hidden=(1,), text_hidden=(2,), dropout=0.0
    )
    with torch.no_grad():
        first, last = model.text_net[0], model.text_net[-1]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        first.weight.copy_(torch.tensor([[1e-30, 0.0], [0.0, 0.0]]))
        first.bias.zero_()
        last.weight.zero_()
        last.weight[:, 0] = 1e-20
        last.bias.zero_()
    model.eval()
    path = TextPath.from_model(model)
    assert path is not None
    columns = [np.array([0], dtype=np.intp), np.array([1], dtype=np.intp)]
    logits = path.logits(columns)
    assert (logits.z[0] > 0).all() and (np.abs(logits.z[0]) < FLOOR).all()
    assert logits.uncertain().tolist() == [True, True]
    expected = model.encode_text(_dense(columns, 2))
    assert (expected == -1).all()  # torch: 0 after float32 rounding, and sign(0) is -1
    assert np.array_equal(path.encode(columns), expected)
    codes, real = path.encode_real(columns)  # torch's real output too, whose sign is its code
    assert np.array_equal(codes, expected) and not (real > 0).any()


def _sequential_with(module: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 16), module, nn.Linear(16, 16))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.train(), "eval mode"),
        (lambda m: m.double(), "float32"),
        (lambda m: setattr(m, "text_net", _sequential_with(nn.Tanh())), "Linear, ReLU"),
        (lambda m: m.text_std.fill_(float("inf")), "finite"),
        (lambda m: setattr(m, "input_norm", "l1"), "input_norm"),
    ],
)
def test_what_cannot_be_reproduced_is_refused_and_logged(
    change: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = HashingModel(
        image_dim=4, text_dim=20, n_bits=16, image_hidden=(4,), text_hidden=(16,), dropout=0.3
    )
    model.eval()
    assert TextPath.from_model(model) is not None
    change(model)  # type: ignore[operator]  # the parametrised lambdas
    with caplog.at_level(logging.WARNING, logger="models.network.text_path"):
        assert TextPath.from_model(model) is None
    assert len(caplog.records) == 1 and reason in caplog.records[0].getMessage()


def test_the_encoder_serves_the_fast_path_with_torchs_codes(
    demo_artifacts_master: Path, rng: np.random.Generator
) -> None:
    checkpoint = load_checkpoint(demo_artifacts_master / "model.pt")
    encoder = Encoder(
        checkpoint, load_backbone(checkpoint.image_backbone), window_ms=0.0, max_batch=1
    )
    try:
        assert encoder.text_path is not None
        assert checkpoint.vocabulary is not None
        texts = _random_texts(rng, checkpoint.vocabulary, 500) + ["", "zebra"]
        codes, unknown = encoder.encode_texts(texts)
        features, expected_unknown = encoder.vectorizer.transform(texts)
        assert np.array_equal(codes, pack_codes(checkpoint.model.encode_text(features)))
        assert np.array_equal(unknown, expected_unknown) and unknown[-2:].all()
        one, _ = encoder.encode_texts(texts[:1])
        assert np.array_equal(one, codes[:1])
    finally:
        encoder.close()


def test_the_real_output_is_torchs_before_sign(rng: np.random.Generator) -> None:
    """encode_real: the codes of `encode`, and the hash layer's real output (tanh, L2-normed)
    within float32 rounding of torch's, from float64 z or, for an uncertain text, torch's."""
    torch.manual_seed(1)
    model = HashingModel(
        image_dim=8, text_dim=300, n_bits=64, image_hidden=(8,), text_hidden=(128,),
        input_norm="l2", dropout=0.0,
    )  # fmt: skip
    bow = (rng.random((400, 300)) < 0.03).astype(np.float32)
    model.fit_statistics(rng.standard_normal((400, 8)).astype(np.float32), bow)
    model.eval()
    path = TextPath.from_model(model)
    assert path is not None
    for columns in _random_columns(rng, 300, 50):
        codes, real = path.encode_real([columns])
        assert np.array_equal(codes, path.encode([columns]))
        assert np.array_equal(codes, np.where(real > 0, 1, -1))
        with torch.inference_mode():
            theirs = model.hash_text(torch.as_tensor(_dense([columns], 300)), binary=False)
        assert np.abs(real - theirs.double().numpy()).max() < 1e-5
        assert abs(float(np.linalg.norm(real)) - 1.0) < 1e-12
