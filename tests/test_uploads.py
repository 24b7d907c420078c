"""service/uploads.py on its own: the decode budget across threads, decode messages, paths."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from PIL import Image

from common.errors import InputError
from service.uploads import PixelBudget, decode_image, folder_inside, read_inside


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 160, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_decode_waits_while_the_budget_is_taken() -> None:
    budget = PixelBudget(limit=100 * 100)
    data = png((100, 80))
    finished = threading.Event()

    def decode() -> None:
        decode_image(data, max_pixels=10**6, budget=budget)
        finished.set()

    with budget.taking(budget.limit):  # other decodes hold all of it
        thread = threading.Thread(target=decode)
        thread.start()
        assert not finished.wait(0.5)  # no room: the decode has not run
        assert budget.in_use == budget.limit
    thread.join(10)
    assert finished.is_set() and budget.in_use == 0


def test_concurrent_decodes_stay_within_the_budget() -> None:
    one = 200 * 150
    budget = PixelBudget(limit=2 * one)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(budget.in_use)

    watcher = threading.Thread(target=watch)
    watcher.start()
    images = [png((200, 150)) for _ in range(8)]
    threads = [
        threading.Thread(
            target=decode_image, args=(d,), kwargs={"max_pixels": 10**6, "budget": budget}
        )
        for d in images * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    watcher.join()
    assert max(seen) <= budget.limit and budget.in_use == 0


def test_an_image_larger_than_the_whole_budget_is_decoded_alone() -> None:
    budget = PixelBudget(limit=10)
    image, extension = decode_image(png((64, 48)), max_pixels=10**6, budget=budget)
    assert image.size == (64, 48) and extension == "png" and budget.in_use == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"plain text", "could not decode image: expected a JPEG, PNG, WEBP, GIF, BMP, TIFF file"),
        (png((10, 10))[:40], "could not decode image"),
    ],
)
def test_decode_messages_name_no_object(data: bytes, message: str) -> None:
    with pytest.raises(InputError) as raised:
        decode_image(data, max_pixels=10**6)
    assert str(raised.value).startswith(message) and " at 0x" not in str(raised.value)


@pytest.mark.parametrize(
    "relative", ["a" * 300, "a/" * 3000 + "b.png", "x\x00.png", "../outside.png", "/etc/passwd"]
)
def test_paths_outside_or_refused_by_the_os_are_input_errors(tmp_path: Path, relative: str) -> None:
    (tmp_path / "outside.png").write_bytes(png((4, 4)))
    base = tmp_path / "data"
    base.mkdir()
    with pytest.raises(InputError, match="inside the server data folder"):
        read_inside(base, relative, max_bytes=10**6)
    with pytest.raises(InputError, match="dataset root"):
        folder_inside(base, relative, what="dataset root")


def test_a_file_past_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(InputError, match="at most 4000 bytes, got 5000"):
        read_inside(tmp_path, "big.png", max_bytes=4000)
    assert read_inside(tmp_path, "big.png", max_bytes=5000) == b"\0" * 5000
