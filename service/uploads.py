"""Image bytes from clients and data folders: decoded under the pixel limits, paths kept inside.

Search and build both decode uploads here, so one set of limits and messages holds for both:
- one image: at most `max_pixels`, checked from the header before anything is decoded;
- all decodes at once: decodes in progress hold at most DECODES.limit pixels between them (a
  PNG of 38 KB can claim 40 M pixels, 160 MB decoded, so eight concurrent requests would take
  over a gigabyte at once); a decode past the budget waits until earlier ones are done;
- freeing a large decoded image asks the C allocator to hand the memory back to the system
  (glibc keeps freed blocks in per-thread arenas, so RSS would otherwise stay at its peak).
"""

from __future__ import annotations

import ctypes
import io
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.errors import InputError
from models.features.image import DRAFT_MIN_SIDE, draft_jpeg, to_rgb
from store.store import STORE_DIR

EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
# What an item's image file may be called (the stored ones take EXTENSIONS' values).
IMAGE_SUFFIXES = frozenset({*EXTENSIONS.values(), "jpeg", "tiff"})
DEFAULT_DECODE_PIXELS = 80_000_000  # two images at the default 40 M pixel limit at once
TRIM_PIXELS = 4_000_000  # freeing an image this large returns the allocator's free memory
TRIM_DELAY_S = 0.05  # after such a free: the frees of one batch of images share one trim
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    except OSError:
        return None


_MALLOC_TRIM = _find_malloc_trim()


def give_back_memory() -> None:
    """Return the C heap's free memory to the system, where the C library can (glibc)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _Trimmer:
    """Gives memory back shortly after a large image is freed, from a thread of its own.

    A weakref callback runs just before the image's memory is freed, so it cannot trim itself;
    it wakes this thread, which trims once the freeing is done (several frees, one trim).
    """

    def __init__(self) -> None:
        self._due = threading.Event()
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Trim soon (at most one trim per TRIM_DELAY_S, however many requests)."""
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trim", daemon=True)
                self._thread.start()
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            time.sleep(TRIM_DELAY_S)
            self._due.clear()
            give_back_memory()


_TRIMMER = _Trimmer()


class PixelBudget:
    """Pixels of the decodes in progress, across threads: a decode waits until its own fit.

    A single image larger than the whole budget is still decoded, alone.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_use = 0
        self._room = threading.Condition()

    @property
    def in_use(self) -> int:
        """Pixels of the decodes in progress now."""
        with self._room:
            return self._in_use

    def resize(self, limit: int) -> None:
        """Change the limit (the app sets it from CMH_MAX_DECODE_PIXELS at startup)."""
        with self._room:
            self.limit = limit
            self._room.notify_all()

    @contextmanager
    def taking(self, pixels: int) -> Iterator[None]:
        """Hold `pixels` of the budget (all of it at most) for the block, waiting for room."""
        with self._room:
            taken = min(pixels, self.limit)
            self._room.wait_for(lambda: self._in_use == 0 or self._in_use + taken <= self.limit)
            self._in_use += taken
        try:
            yield
        finally:
            with self._room:
                self._in_use -= taken
                self._room.notify_all()


DECODES = PixelBudget(DEFAULT_DECODE_PIXELS)  # memory is the process's: one budget for all apps


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    budget: PixelBudget = DECODES,
    min_side: int = DRAFT_MIN_SIDE,
) -> tuple[Image.Image, str]:
    """(RGB image, file extension) from image file bytes; InputError saying why it cannot be.

    A large JPEG decodes at reduced DCT scale (draft_jpeg: the short side stays >= min_side, the
    backbone's draft_min_side, 4x its resize, within the fast path's tolerance), as `cmh features`
    reads files, so a
    search and a build see the image an offline build sees. The decode takes its width * height
    (after the draft) from `budget` while it runs.
    """
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
            draft_jpeg(im, min_side)
            with budget.taking(im.size[0] * im.size[1]):
                im.load()
                image = to_rgb(im)
    except UnidentifiedImageError:
        raise InputError(
            f"could not decode image: expected a {', '.join(EXTENSIONS)} file, got other bytes"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        message = _OBJECT_REPR.sub("the upload", str(err))
        raise InputError(f"could not decode image: {message}") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"expected a reasonably sized image, got: {err}") from None
    if width * height >= TRIM_PIXELS:
        weakref.finalize(image, _TRIMMER.request)
    return image, EXTENSIONS[fmt]


def inside(base: Path, relative: str, *, what: str = "path") -> Path:
    """base / relative, refusing anything that resolves outside base (.., absolute, symlinks)."""
    try:
        target = (base / relative).resolve()
    except (OSError, ValueError, RuntimeError) as err:  # NUL bytes, names the OS refuses, loops
        raise InputError(
            f"expected a valid {what} inside the server data folder, got {_short(relative)}: "
            f"{_why(err)}"
        ) from None
    if not target.is_relative_to(base.resolve()):
        raise InputError(f"expected a {what} inside the server data folder, got {_short(relative)}")
    return target


def servable_image(artifacts: Path, image: str) -> Path:
    """The file an item's image reference names, checked when serving, on every backend: inside
    the artifacts folder (after symlinks), outside the store's own folder, with an image
    file's extension. A row is data, and whoever can write one (a Milvus collection is written
    over the network) must not make the service read its checkpoint, job records or any other
    file; InputError saying which rule the reference breaks."""
    path = inside(artifacts, image, what="image reference")
    if path.is_relative_to((artifacts / STORE_DIR).resolve()):
        raise InputError(f"expected an image outside the store's own folder, got {_short(image)}")
    if path.suffix.lower().lstrip(".") not in IMAGE_SUFFIXES:
        raise InputError(
            f"expected an image file ({', '.join(sorted(IMAGE_SUFFIXES))}), got {_short(image)}"
        )
    return path


def read_inside(base: Path, relative: str, *, max_bytes: int) -> bytes:
    """The bytes of the file at base / relative (see `inside`), refused past max_bytes unread."""
    path = inside(base, relative)
    try:
        if not path.is_file():
            raise InputError(f"expected an image file at {_short(relative)}, found none")
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(f"expected an image of at most {max_bytes} bytes, got {size}")
        return path.read_bytes()
    except OSError as err:  # a name too long, a file that went away, no permission
        raise InputError(
            f"expected a valid path inside the server data folder, got {_short(relative)}: "
            f"{_why(err)}"
        ) from None


def folder_inside(base: Path, relative: str, *, what: str) -> Path:
    """The folder base / relative (see `inside`); InputError naming `what` when there is none."""
    path = inside(base, relative, what=what)
    try:
        found = path.is_dir()
    except OSError as err:
        raise InputError(
            f"expected a valid {what} inside the server data folder, got {_short(relative)}: "
            f"{_why(err)}"
        ) from None
    if not found:
        raise InputError(f"expected the {what} to be a folder, got {_short(relative)}")
    return path


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else f"{text[:limit]}...")


def _why(err: BaseException) -> str:
    """What the OS said, without the path it was given (which can be kilobytes long)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)[:200]
