"""Image bytes from clients and data folders: decoded under the pixel limit, paths kept inside.

Search and build both decode uploads here, so one set of limits and messages holds for both.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.errors import InputError
from models.image_features import to_rgb

EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}


def decode_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, str]:
    """(RGB image, file extension) from image file bytes; InputError saying why it cannot be."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            width, height = im.size
            if width * height > max_pixels:  # checked before decoding: a bomb never expands
                raise InputError(
                    f"expected at most {max_pixels} pixels, got {width}x{height} = {width * height}"
                )
            if fmt not in EXTENSIONS:
                raise InputError(f"expected one of {', '.join(EXTENSIONS)} images, got {fmt!r}")
            im.load()
            return to_rgb(im), EXTENSIONS[fmt]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"could not decode image: {err}") from err
    except Image.DecompressionBombError as err:
        raise InputError(f"expected a reasonably sized image, got: {err}") from err


def inside(base: Path, relative: str) -> Path:
    """base / relative, refusing anything that resolves outside base (.., absolute, symlinks)."""
    try:
        target = (base / relative).resolve()
    except (OSError, ValueError) as err:  # NUL bytes, names the OS refuses
        raise InputError(f"expected a valid path inside the server data folder: {err}") from err
    if not target.is_relative_to(base.resolve()):
        raise InputError(f"expected a path inside the server data folder, got {relative!r}")
    return target
