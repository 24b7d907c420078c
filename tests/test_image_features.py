"""Image backbones: real EfficientNet-Lite0 weights, VGG19 fc7 with random weights, colour modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import vgg19

from common.errors import InputError
from models.data import PairDataset
from models.image_features import encode_images, load_backbone, load_vgg19_fc7, to_rgb


@pytest.fixture(scope="module")
def lite() -> object:
    return load_backbone("efficientnet-lite0", device=torch.device("cpu"))


def test_efficientnet_lite0_gives_1280_d_features_in_input_order(
    lite: object, demo_root: Path
) -> None:
    paths = sorted((demo_root / "images").glob("*.jpg"))[:5]
    feats = encode_images(lite, paths, batch_size=2)  # type: ignore[arg-type]
    assert feats.shape == (5, 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    one = encode_images(lite, [paths[3]])  # type: ignore[arg-type]
    np.testing.assert_allclose(one[0], feats[3], rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats[0], feats[1])


def test_pretrained_weights_separate_scene_kinds(demo_data: PairDataset) -> None:
    """Real ImageNet weights: two scenes of the same kind are closer than scenes of other kinds."""
    assert demo_data.image_features is not None
    data = demo_data
    single = np.flatnonzero(data.labels.sum(axis=1) == 1)
    feats = data.image_features[single]
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = feats @ feats.T
    same = data.labels[single] @ data.labels[single].T > 0
    off_diagonal = ~np.eye(len(single), dtype=bool)
    assert sims[same & off_diagonal].mean() > sims[~same].mean() + 0.02


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "P", "LA", "I;16"])
def test_any_colour_mode_becomes_rgb(mode: str) -> None:
    image = Image.new(mode, (10, 10))
    assert to_rgb(image).mode == "RGB"


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_vgg19_fc7_random_weights_is_4096_after_relu() -> None:
    torch.manual_seed(0)
    backbone = load_backbone("vgg19", device=torch.device("cpu"))
    feats = encode_images(backbone, [Image.new("RGB", (300, 200), (30, 120, 200))])
    assert feats.shape == (1, 4096) and (feats >= 0).all()


def test_vgg19_weights_file_is_checked(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_vgg19_fc7(tmp_path / "absent.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="does not fit vgg19"):
        load_vgg19_fc7(tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(InputError, match="expected a torch state dict"):
        load_vgg19_fc7(tmp_path / "junk.pth")


def test_vgg19_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = vgg19(weights=None).eval()
    torch.save(reference.state_dict(), tmp_path / "vgg19.pth")
    loaded = load_vgg19_fc7(tmp_path / "vgg19.pth").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = reference.classifier[:5](
            torch.flatten(reference.avgpool(reference.features(x)), 1)
        )
        np.testing.assert_allclose(loaded(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_backbone_and_undecodable_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a backbone"):
        load_backbone("resnet50")
    (tmp_path / "x.jpg").write_bytes(b"\x00" * 10)
    backbone = load_backbone("efficientnet-lite0", device=torch.device("cpu"))
    with pytest.raises(InputError, match="could not decode image"):
        encode_images(backbone, [tmp_path / "x.jpg"])


@pytest.mark.gpu
def test_cuda_runs_in_half_precision() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    backbone = load_backbone("efficientnet-lite0")
    assert backbone.device.type == "cuda" and backbone.dtype == torch.float16
    feats = encode_images(backbone, [Image.new("RGB", (224, 224), (200, 30, 30))] * 4)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
