"""The embedded demo dataset: rendered picture-book scenes with English captions, made offline.

Each scene has a background (sky, grass, sea, night, sunset, wall) and one to three objects from ten
kinds (sun, moon, tree, house, car, boat, balloon, fish, flower, star) in various colours, sizes and
places; its caption names them ("a large red car on the left and a yellow sun at the top, under a
blue sky"), and its multi-hot labels are the kinds present, so captions and images share the label
semantics. Generation is deterministic for a seed (one RNG per scene) and takes seconds.

Layout written under `root`: images/<id>.jpg, captions.jsonl (one {"id", "image", "caption",
"labels", "split"} object per line), labels.txt (the kinds, in label order).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from common.errors import InputError
from common.fsio import atomic_write_bytes, fsync_dir
from models.data.dataset import PairDataset, Rejection

logger = logging.getLogger(__name__)

KINDS = ("sun", "moon", "tree", "house", "car", "boat", "balloon", "fish", "flower", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 160, 60),
    "yellow": (245, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Kinds whose colour is part of what they are, so captions do not vary it.
NATURAL = {"sun": "yellow", "moon": "white", "tree": "green"}
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "under a blue sky": ((120, 180, 240), (200, 230, 255)),
    "on green grass": ((90, 170, 80), (150, 210, 110)),
    "by the sea": ((30, 90, 160), (90, 160, 210)),
    "in the night": ((10, 15, 50), (40, 40, 90)),
    "at sunset": ((250, 150, 80), (120, 60, 120)),
    "against a grey wall": ((170, 170, 170), (210, 210, 210)),
}
SIZE = 224
N_DEFAULT = 3000
QUERY_FRACTION = 0.1


@dataclass(frozen=True)
class Placed:
    """One object in a scene: its kind, colour name, size word and place words."""

    kind: str
    colour: str
    size: str
    place: str


def _mask(kind: str, box: tuple[int, int, int, int], rng: np.random.Generator) -> Image.Image:
    """A white-on-black mask of the kind's silhouette inside box (x0, y0, x1, y1)."""
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "sun":
        r = w * 0.3
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        for a in range(0, 360, 30):
            t = math.radians(a + float(rng.integers(0, 30)))
            d.line(
                (cx + r * 1.2 * math.cos(t), cy + r * 1.2 * math.sin(t))
                + (cx + r * 1.7 * math.cos(t), cy + r * 1.7 * math.sin(t)),
                fill=255,
                width=max(2, w // 20),
            )
    elif kind == "moon":
        d.ellipse((x0, y0, x1, y1), fill=255)
        d.ellipse((x0 + w * 0.35, y0 - h * 0.1, x1 + w * 0.35, y1 - h * 0.1), fill=0)
    elif kind == "tree":
        d.rectangle((cx - w * 0.08, cy, cx + w * 0.08, y1), fill=128)
        d.ellipse((x0 + w * 0.1, y0, x1 - w * 0.1, cy + h * 0.15), fill=255)
    elif kind == "house":
        d.rectangle((x0 + w * 0.1, cy - h * 0.05, x1 - w * 0.1, y1), fill=255)
        d.polygon([(x0, cy), (cx, y0), (x1, cy)], fill=255)
        d.rectangle((cx - w * 0.08, y1 - h * 0.3, cx + w * 0.08, y1), fill=64)
    elif kind == "car":
        d.rounded_rectangle((x0, cy - h * 0.15, x1, cy + h * 0.2), radius=w // 10, fill=255)
        d.rounded_rectangle(
            (x0 + w * 0.2, cy - h * 0.4, x1 - w * 0.25, cy), radius=w // 12, fill=255
        )
        for wx in (x0 + w * 0.25, x1 - w * 0.25):
            d.ellipse((wx - w * 0.12, cy + h * 0.1, wx + w * 0.12, cy + h * 0.34), fill=64)
    elif kind == "boat":
        d.polygon(
            [(x0, cy + h * 0.1), (x1, cy + h * 0.1), (x1 - w * 0.2, y1), (x0 + w * 0.2, y1)],
            fill=255,
        )
        d.polygon([(cx, y0), (cx, cy + h * 0.05), (x1 - w * 0.1, cy + h * 0.05)], fill=200)
    elif kind == "balloon":
        d.ellipse((x0 + w * 0.2, y0, x1 - w * 0.2, cy + h * 0.15), fill=255)
        d.line((cx, cy + h * 0.15, cx + w * 0.05, y1), fill=160, width=2)
    elif kind == "fish":
        d.ellipse((x0 + w * 0.25, cy - h * 0.22, x1, cy + h * 0.22), fill=255)
        d.polygon([(x0 + w * 0.3, cy), (x0, cy - h * 0.22), (x0, cy + h * 0.22)], fill=255)
        d.ellipse((x1 - w * 0.22, cy - h * 0.08, x1 - w * 0.14, cy), fill=32)
    elif kind == "flower":
        d.line((cx, cy, cx, y1), fill=128, width=max(2, w // 16))
        pr = w * 0.15
        for a in range(0, 360, 60):
            px, py = (
                cx + w * 0.2 * math.cos(math.radians(a)),
                cy - h * 0.15 + h * 0.2 * math.sin(math.radians(a)),
            )
            d.ellipse((px - pr, py - pr, px + pr, py + pr), fill=255)
        d.ellipse((cx - pr, cy - h * 0.15 - pr, cx + pr, cy - h * 0.15 + pr), fill=96)
    else:  # star
        pts = []
        for i in range(10):
            r = (w / 2) if i % 2 == 0 else (w / 5)
            t = math.radians(-90 + 36 * i)
            pts.append((cx + r * math.cos(t), cy + r * math.sin(t)))
        d.polygon(pts, fill=255)
    return m


def _place_words(cx: float, cy: float) -> str:
    horizontal = "on the left" if cx < SIZE / 3 else "on the right" if cx > 2 * SIZE / 3 else ""
    vertical = "at the top" if cy < SIZE / 3 else "at the bottom" if cy > 2 * SIZE / 3 else ""
    if horizontal and vertical:
        return f"{vertical} {horizontal.split()[-1]}".replace("at the ", "in the ")
    return horizontal or vertical or "in the middle"


def render_scene(rng: np.random.Generator) -> tuple[Image.Image, str, list[str]]:
    """One scene: (RGB image, caption, kinds present)."""
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    top, bottom = BACKGROUNDS[background]
    ramp = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    pixels = (1 - ramp) * np.asarray(top) + ramp * np.asarray(bottom)
    noise = rng.normal(0, 6, size=(SIZE, SIZE, 3))
    image = Image.fromarray(
        np.clip(np.broadcast_to(pixels, (SIZE, SIZE, 3)) + noise, 0, 255).astype(np.uint8)
    )
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    kinds = [str(k) for k in rng.choice(KINDS, size=n_objects, replace=False)]
    placed: list[Placed] = []
    for kind in kinds:
        large = bool(rng.random() < 0.5)
        w = int(rng.integers(90, 130) if large else rng.integers(50, 80))
        x0, y0 = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - w))
        colour = NATURAL.get(kind) or str(
            rng.choice([c for c in COLOURS if c != "white"] + ["white"])
        )
        mask = _mask(kind, (x0, y0, x0 + w, y0 + w), rng)
        shade = np.asarray(COLOURS[colour], dtype=np.float64) * rng.uniform(0.85, 1.1)
        fill = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in np.clip(shade, 0, 255)))
        detail = Image.new("RGB", (SIZE, SIZE), (60, 40, 20))  # trunks, wheels, doors, stems
        image.paste(detail, (0, 0), mask.point(lambda v: 255 if 0 < v < 200 else 0))
        image.paste(fill, (0, 0), mask.point(lambda v: 255 if v >= 200 else 0))
        placed.append(
            Placed(
                kind, colour, "large" if large else "small", _place_words(x0 + w / 2, y0 + w / 2)
            )
        )
    phrases = [f"a {p.size} {p.colour} {p.kind} {p.place}" for p in placed]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return image, f"{objects}, {background}", kinds


def generate_demo(root: Path, *, n: int = N_DEFAULT, seed: int = 0, progress: bool = False) -> Path:
    """Render n scenes into root (built in a sibling folder, then renamed); returns root.

    The rename is the commit: captions.jsonl, which marks a demo as present, is durable before
    it, and the rename itself after it (common.fsio). The images are not fsynced one by one.
    """
    if n < 20:
        raise InputError(f"expected at least 20 demo scenes, got {n}")
    root = Path(root)
    if (root / "captions.jsonl").is_file():
        raise InputError(f"expected {str(root)!r} to hold no demo yet; remove it to regenerate")
    tmp = root.with_name(root.name + ".partial")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    n_query = max(1, round(QUERY_FRACTION * n))
    is_query = np.zeros(n, dtype=bool)
    is_query[np.random.default_rng([seed, 1]).permutation(n)[:n_query]] = True
    lines = []
    for i in tqdm(range(n), desc="demo scenes", disable=not progress):
        image, caption, kinds = render_scene(np.random.default_rng([seed, 0, i]))
        name = f"images/{i:05d}.jpg"
        image.save(tmp / name, quality=92)
        split = "query" if is_query[i] else "database"
        record = {
            "id": f"{i:05d}",
            "image": name,
            "caption": caption,
            "labels": kinds,
            "split": split,
        }
        lines.append(json.dumps(record))
    atomic_write_bytes(tmp / "labels.txt", ("\n".join(KINDS) + "\n").encode("utf-8"))
    atomic_write_bytes(tmp / "captions.jsonl", ("\n".join(lines) + "\n").encode("utf-8"))
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()  # only an empty folder can be here (captions.jsonl was checked above)
    os.replace(tmp, root)
    fsync_dir(root.parent)
    logger.info("generated %d demo scenes (%d queries) in %s", n, n_query, root)
    return root


def load_demo(root: Path) -> PairDataset:
    """Load a generated demo from root; a missing or broken record is rejected with its reason."""
    captions = root / "captions.jsonl"
    if not captions.is_file():
        raise InputError(
            f"expected a demo at {str(root)!r} (captions.jsonl); run `cmh demo generate`"
        )
    label_names = (root / "labels.txt").read_text("utf-8").split()
    ids, paths, texts, label_rows, splits = [], [], [], [], []
    rejected: list[Rejection] = []
    lines = [ln for ln in captions.read_text("utf-8").splitlines() if ln.strip()]
    for number, line in enumerate(lines, start=1):
        where = f"captions.jsonl line {number}"
        try:
            rec = json.loads(line)
            path = root / rec["image"]
            row = np.zeros(len(label_names), dtype=np.uint8)
            row[[label_names.index(k) for k in rec["labels"]]] = 1
            caption, split = str(rec["caption"]), str(rec["split"])
        except (ValueError, KeyError, TypeError) as err:
            rejected.append(Rejection(where, f"malformed record: {err}"))
            continue
        if not path.is_file():
            rejected.append(Rejection(where, f"image not found: {rec['image']}"))
            continue
        ids.append(str(rec["id"]))
        paths.append(path)
        texts.append(caption)
        label_rows.append(row)
        splits.append(split)
    split_arr = np.asarray(splits)
    db_idx = np.flatnonzero(split_arr == "database").astype(np.int64)
    return PairDataset(
        name="demo",
        ids=ids,
        labels=np.asarray(label_rows, dtype=np.uint8).reshape(len(ids), len(label_names)),
        train_idx=db_idx,
        query_idx=np.flatnonzero(split_arr == "query").astype(np.int64),
        database_idx=db_idx,
        label_names=label_names,
        image_paths=paths,
        texts=texts,
        listed=len(lines),
        rejected=rejected,
        protocol="queries = the generated query split (10%, seeded); database = train = the rest",
    )
