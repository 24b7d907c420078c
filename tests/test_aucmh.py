"""The hash layer and HashingModel: exact signs, straight-through gradients, int8 codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import InputError
from models.aucmh import HashingModel, hash_layer


def _model(seed: int = 0) -> HashingModel:
    torch.manual_seed(seed)
    return HashingModel(
        image_dim=12, text_dim=7, n_bits=16, image_hidden=(32, 24), text_hidden=(8,)
    )


def test_hash_layer_sign_of_zero_is_minus_one_and_values_are_exact() -> None:
    z = torch.tensor([[0.0, 2.0, -3.0, 1e-30]])
    h = hash_layer(z)
    # Eq. 1: +1 only for x > 0; tanh(1e-30) is positive, so it maps to +1.
    assert h.tolist() == [[-1.0, 1.0, -1.0, 1.0]]


def test_hash_layer_straight_through_gradient() -> None:
    z = torch.tensor([[0.5, -0.2, 1.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, 3.0]])
    (hash_layer(z) * weights).sum().backward()
    expected_z = z.detach().clone().requires_grad_(True)
    (hash_layer(expected_z, binary=False) * weights).sum().backward()
    # STE: the gradient is that of the continuous (tanh, normalise) path, as if sign were identity.
    assert z.grad is not None and expected_z.grad is not None
    assert torch.allclose(z.grad, expected_z.grad)
    assert z.grad.abs().sum() > 0


def test_gradients_reach_the_first_layer_of_both_mlps() -> None:
    model = _model()
    xi, xt = torch.randn(5, 12), torch.randn(5, 7)
    (model.hash_image(xi) @ model.hash_text(xt).T).diagonal().sum().backward()
    for net in (model.image_net, model.text_net):
        first = net[0]
        assert isinstance(first, torch.nn.Linear)
        assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_layout_has_relu_after_every_layer_but_the_last() -> None:
    names = [type(m).__name__ for m in _model().image_net]
    assert names == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_encode_returns_int8_codes_and_standardises_inside() -> None:
    rng = np.random.default_rng(0)
    model = _model()
    image = rng.normal(5.0, 3.0, size=(50, 12)).astype(np.float32)
    text = rng.normal(size=(50, 7)).astype(np.float32)
    model.fit_statistics(image, text)
    codes = model.encode_image(image)
    assert codes.dtype == np.int8 and codes.shape == (50, 16)
    assert set(np.unique(codes)) <= {-1, 1}
    with torch.no_grad():
        manual = model.image_net(torch.as_tensor((image - image.mean(0)) / image.std(0)))
    assert np.array_equal(codes, np.where(manual.numpy() > 0, 1, -1))
    assert model.encode_text(text).shape == (50, 16)


def test_encode_rejects_wrong_width() -> None:
    with pytest.raises(InputError, match=r"expected image features of shape \(n, 12\)"):
        _model().encode_image(np.zeros((3, 11), dtype=np.float32))


def test_l2_input_norm_scales_rows_then_centres_with_one_scale() -> None:
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    model = HashingModel(
        image_dim=12, text_dim=7, n_bits=16, image_hidden=(32,), text_hidden=(8,),
        input_norm="l2",
    )  # fmt: skip
    image = rng.gamma(2.0, size=(40, 12)).astype(np.float32)
    text = rng.gamma(2.0, size=(40, 7)).astype(np.float32)
    model.fit_statistics(image, text)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    centred = unit - unit.mean(0)
    rms = np.sqrt((centred**2).sum(1).mean())
    # One scale for every column: the relative weight of columns survives (unlike z-scoring).
    assert np.allclose(model.image_std.numpy(), rms, rtol=1e-5)
    with torch.no_grad():
        manual = model.image_net(torch.as_tensor(centred / rms, dtype=torch.float32))
    assert np.array_equal(model.encode_image(image), np.where(manual.numpy() > 0, 1, -1))
    # Scaling a row does not change its code.
    assert np.array_equal(model.encode_image(image * 7.0), model.encode_image(image))


def test_dropout_follows_each_hidden_relu_and_is_off_when_encoding() -> None:
    torch.manual_seed(0)
    model = HashingModel(
        image_dim=12, text_dim=7, n_bits=16, image_hidden=(32, 24), text_hidden=(8,),
        dropout=0.5,
    )  # fmt: skip
    names = [type(m).__name__ for m in model.image_net]
    assert names == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    model.train()
    assert np.array_equal(model.encode_image(x), model.encode_image(x))
    assert model.training  # encode restores the mode it found


def test_unknown_input_norm_is_refused() -> None:
    with pytest.raises(
        InputError, match=r"expected input_norm in \('zscore', 'l2'\), got 'minmax'"
    ):
        HashingModel(
            image_dim=3, text_dim=3, n_bits=16, image_hidden=(), text_hidden=(),
            input_norm="minmax",
        )  # fmt: skip
