"""The hash layer and HashingModel: exact signs, straight-through gradients, int8 codes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from common.errors import InputError
from models.network.aucmh import HashingModel, ModelConfig, build_model, hash_layer


def _model(seed: int = 0) -> HashingModel:
    """A small network in eval mode, ready to encode."""
    torch.manual_seed(seed)
    return HashingModel(
        image_dim=12, text_dim=7, n_bits=16, image_hidden=(32, 24), text_hidden=(8,)
    ).eval()


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
    model = _model().train()
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
    ).eval()  # fmt: skip
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
    ).eval()  # fmt: skip
    names = [type(m).__name__ for m in model.image_net]
    assert names == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    with torch.no_grad():
        no_dropout = model.image_net(torch.as_tensor(x))  # identity statistics: x as is
    assert np.array_equal(model.encode_image(x), np.where(no_dropout.numpy() > 0, 1, -1))


def test_encode_refuses_training_mode_and_never_switches_modes(monkeypatch) -> None:
    model = _model()
    x = np.zeros((3, 12), dtype=np.float32)
    modes: list[bool] = []
    model.image_net.register_forward_pre_hook(lambda m, args: modes.append(m.training))

    def no_switch(mode: bool = True) -> HashingModel:
        raise AssertionError(f"encode switched the mode to training={mode}")

    monkeypatch.setattr(model, "train", no_switch)
    monkeypatch.setattr(model, "eval", no_switch)
    model.encode_image(x)
    model.encode_text(np.zeros((3, 7), dtype=np.float32))
    assert modes == [False] and not model.training
    monkeypatch.undo()
    model.train()
    with pytest.raises(RuntimeError, match="expected the model in eval mode to encode"):
        model.encode_image(x)
    assert model.training and modes == [False]


def test_encode_from_many_threads_at_once_gives_the_serial_codes() -> None:
    torch.manual_seed(0)
    model = HashingModel(
        image_dim=12, text_dim=7, n_bits=64, image_hidden=(256,), text_hidden=(256,),
        dropout=0.5,
    ).eval()  # fmt: skip
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(200, 12)).astype(np.float32) for _ in range(8)]
    serial = [model.encode_image(x) for x in inputs]
    barrier = threading.Barrier(len(inputs))
    results: list[np.ndarray | None] = [None] * len(inputs)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            codes = model.encode_image(inputs[i])
            assert results[i] is None or np.array_equal(results[i], codes)
            results[i] = codes

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and np.array_equal(r, s) for r, s in zip(results, serial, strict=True))
    assert not model.training


def test_build_model_makes_the_network_its_config_describes() -> None:
    config = ModelConfig(
        image_dim=12, text_dim=7, n_bits=32, image_hidden=(16,), text_hidden=(), input_norm="l2",
        dropout=0.2,
    )  # fmt: skip
    model = build_model(config)
    assert model.config == config and model.n_bits == 32 and model.input_norm == "l2"
    assert [type(m).__name__ for m in model.image_net] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert [type(m).__name__ for m in model.text_net] == ["Linear"]
    assert model.text_net[0].in_features == 7 and model.text_net[0].out_features == 32


def test_unknown_input_norm_is_refused() -> None:
    with pytest.raises(
        InputError, match=r"expected input_norm in \('zscore', 'l2'\), got 'minmax'"
    ):
        HashingModel(
            image_dim=3, text_dim=3, n_bits=16, image_hidden=(), text_hidden=(),
            input_norm="minmax",
        )  # fmt: skip
