"""The pairs format (models/data/pairs.py): real files on disk, every defect rejected with its line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from common.errors import InputError
from models.data.dataset import PairDataset
from models.data.loaders import load_dataset
from models.methods.compare import evaluate_methods, parse_methods

GOOD_BEFORE = {"id": "before", "image": "good.png", "text": "a red square"}
GOOD_AFTER = {"id": "after", "image": "photos/photo.jpg", "text": "a blue photo"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A dataset folder with a PNG, a JPEG, a broken image and a symlink to an image outside it."""
    root = tmp_path / "mine"
    (root / "photos").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "good.png")
    Image.new("RGB", (8, 8), "blue").save(root / "photos" / "photo.jpg", format="JPEG")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (8, 8), "green").save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    return root


def write_jsonl(root: Path, lines: list[object]) -> None:
    """pairs.jsonl with one line per item: a dict as JSON, bytes and str as they are."""
    parts = []
    for line in lines:
        if isinstance(line, bytes):
            parts.append(line)
        elif isinstance(line, str):
            parts.append(line.encode())
        else:
            parts.append(json.dumps(line).encode())
    (root / "pairs.jsonl").write_bytes(b"\n".join(parts) + b"\n")


def load(root: Path) -> PairDataset:
    return load_dataset("pairs", root)


def test_good_jsonl_loads_ids_texts_labels_splits_and_extra(root: Path) -> None:
    write_jsonl(
        root,
        [
            {
                "id": 7,
                "image": "good.png",
                "text": "  red  ",
                "labels": ["b", "a"],
                "split": "train",
            },
            {"id": "q1", "image": "photos/photo.jpg", "text": "blue", "split": "query"},
            {"id": "d1", "image": "good.png", "text": "db", "labels": ["c"], "split": "database"},
            {"id": "d2", "image": "good.png", "text": "default", "camera": {"iso": 100}},
        ],
    )
    data = load(root)
    assert data.name == "pairs" and data.listed == 4 and data.rejected == []
    assert data.ids == ["7", "q1", "d1", "d2"]
    assert data.texts == ["red", "blue", "db", "default"]
    assert data.image_paths == [
        (root / p).resolve() for p in ("good.png", "photos/photo.jpg", "good.png", "good.png")
    ]
    assert data.label_names == ["a", "b", "c"]
    assert data.labels.dtype == np.uint8
    assert data.labels.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert data.train_idx.tolist() == [0, 2, 3]  # train + database
    assert data.database_idx.tolist() == [2, 3]  # no split given = database
    assert data.query_idx.tolist() == [1]
    # labels are kept with the item too (its `labels` field once indexed)
    assert data.extra == [{"labels": ["b", "a"]}, {}, {"labels": ["c"]}, {"camera": {"iso": 100}}]
    assert "1 queries" in data.protocol


def test_good_csv_loads_with_labels_splits_extra_and_quoted_fields(root: Path) -> None:
    # As a spreadsheet saves it: a byte-order mark and CRLF line ends; a blank line is skipped.
    (root / "pairs.csv").write_bytes(
        (
            "id,image,text,labels,split,author\r\n"
            '1,good.png,"red, square",cat;dog,train,ann\r\n'
            "\r\n"
            "2, photos/photo.jpg,blue\u2028photo,,query,\r\n"
            '3,good.png,"two\nlines",dog,,bo\r\n'
        ).encode("utf-8-sig")
    )
    data = load(root)
    assert data.listed == 3 and data.rejected == []
    assert data.ids == ["1", "2", "3"]
    assert data.texts == ["red, square", "blue\u2028photo", "two\nlines"]
    assert data.image_paths is not None and data.image_paths[1] == root / "photos" / "photo.jpg"
    assert data.label_names == ["cat", "dog"]
    assert data.labels.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert data.train_idx.tolist() == [0, 2]
    assert data.database_idx.tolist() == [2]
    assert data.query_idx.tolist() == [1]
    assert data.extra == [
        {"author": "ann", "labels": ["cat", "dog"]},
        {"author": ""},
        {"author": "bo", "labels": ["dog"]},
    ]


def test_no_split_anywhere_means_database_is_train_and_no_queries(root: Path) -> None:
    write_jsonl(root, [GOOD_BEFORE, GOOD_AFTER])
    data = load(root)
    assert data.train_idx.tolist() == data.database_idx.tolist() == [0, 1]
    assert data.query_idx.size == 0
    assert data.labels.shape == (2, 0) and data.label_names == []
    assert "no split given" in data.protocol and "no queries" in data.protocol


DEFECTS = [
    ("invalid-json", '{"id": "x", "image": ', "malformed line: invalid JSON"),
    ("not-an-object", '["x", "good.png", "text"]', "expected a JSON object"),
    ("not-utf8", b'{"id": "x", "image": "good.png", "text": "\xff"}', "not UTF-8"),
    ("missing-id", {"image": "good.png", "text": "t"}, "missing id"),
    ("bool-id", {"id": True, "image": "good.png", "text": "t"}, "invalid id"),
    ("negative-id", {"id": -1, "image": "good.png", "text": "t"}, "invalid id"),
    ("float-id", {"id": 1.5, "image": "good.png", "text": "t"}, "invalid id"),
    ("null-id", {"id": None, "image": "good.png", "text": "t"}, "invalid id"),
    ("empty-id", {"id": "", "image": "good.png", "text": "t"}, "invalid id"),
    ("long-id", {"id": "x" * 257, "image": "good.png", "text": "t"}, "1..256 characters"),
    ("control-id", {"id": "a\u0007b", "image": "good.png", "text": "t"}, "control characters"),
    ("dot-id", {"id": ".", "image": "good.png", "text": "t"}, "other than '.' and '..'"),
    ("dotdot-id", {"id": "..", "image": "good.png", "text": "t"}, "other than '.' and '..'"),
    ("missing-text", {"id": "x", "image": "good.png"}, "missing text"),
    ("empty-text", {"id": "x", "image": "good.png", "text": " \n\t "}, "empty text"),
    ("number-text", {"id": "x", "image": "good.png", "text": 3}, "invalid text"),
    ("missing-image", {"id": "x", "text": "t"}, "missing image"),
    ("number-image", {"id": "x", "image": 3, "text": "t"}, "invalid image"),
    ("dotdot-outside", {"id": "x", "image": "../outside.png", "text": "t"}, "escapes the root"),
    ("dotdot-inside", {"id": "x", "image": "sub/../good.png", "text": "t"}, "escapes the root"),
    ("symlink-outside", {"id": "x", "image": "link.png", "text": "t"}, "resolves outside"),
    ("nul-path", {"id": "x", "image": "go\u0000od.png", "text": "t"}, "rejected by the OS"),
    ("long-name", {"id": "x", "image": "n" * 5000 + ".png", "text": "t"}, "rejected by the OS"),
    ("missing-file", {"id": "x", "image": "absent.png", "text": "t"}, "missing image file"),
    ("directory", {"id": "x", "image": "photos", "text": "t"}, "missing image file"),
    ("undecodable", {"id": "x", "image": "broken.png", "text": "t"}, "undecodable image"),
    ("unknown-split", {"id": "x", "image": "good.png", "text": "t", "split": "test"}, "split"),
    ("labels-string", {"id": "x", "image": "good.png", "text": "t", "labels": "cat"}, "labels"),
    ("labels-numbers", {"id": "x", "image": "good.png", "text": "t", "labels": [1]}, "labels"),
    (
        "deep-fields",  # issue 35: 255 levels failed every search that returned the item
        {"id": "x", "image": "good.png", "text": "t", "f": json.loads("[" * 255 + "]" * 255)},
        "invalid fields: expected the item's fields nested at most 32 levels deep",
    ),
    (
        "large-fields",
        {"id": "x", "image": "good.png", "text": "t", "f": "y" * 17_000},
        "invalid fields: expected the item's fields to take at most 16384 bytes",
    ),
]


@pytest.mark.parametrize(("line", "phrase"), [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_each_defect_is_rejected_with_its_line_and_the_rest_loads(
    root: Path, line: object, phrase: str
) -> None:
    write_jsonl(root, [GOOD_BEFORE, line, GOOD_AFTER])
    data = load(root)
    assert data.ids == ["before", "after"] and data.listed == 3
    assert len(data.rejected) == 1
    assert data.rejected[0].pair.startswith("line 2: ")
    assert phrase in data.rejected[0].reason


def test_absolute_image_path_is_rejected_even_inside_the_root(root: Path) -> None:
    inside = str((root / "good.png").resolve())
    write_jsonl(root, [GOOD_BEFORE, {"id": "x", "image": inside, "text": "t"}, GOOD_AFTER])
    data = load(root)
    assert data.ids == ["before", "after"]
    assert data.rejected[0].pair.startswith("line 2: ")
    assert "escapes the root" in data.rejected[0].reason


def test_later_lines_repeating_an_id_are_rejected_naming_the_first(root: Path) -> None:
    write_jsonl(
        root,
        [
            {"id": 7, "image": "good.png", "text": "first"},
            GOOD_AFTER,
            {"id": "7", "image": "good.png", "text": "same id as a string"},
            {"id": 7, "image": "good.png", "text": "third"},
        ],
    )
    data = load(root)
    assert data.ids == ["7", "after"] and data.texts == ["first", "a blue photo"]
    assert [r.pair[:7] for r in data.rejected] == ["line 3:", "line 4:"]
    assert all("duplicate id" in r.reason and "first on line 1" in r.reason for r in data.rejected)


def test_blank_lines_are_skipped_but_keep_the_numbering(root: Path) -> None:
    write_jsonl(root, [GOOD_BEFORE, "", "   ", {"id": "x", "image": "good.png"}, GOOD_AFTER])
    data = load(root)
    assert data.listed == 3 and data.ids == ["before", "after"]
    assert data.rejected[0].pair.startswith("line 4: ")


def test_csv_wrong_field_count_is_rejected_with_its_file_line(root: Path) -> None:
    (root / "pairs.csv").write_text(
        'id,image,text\na,good.png,"spans\ntwo lines"\nb,good.png,too,many\nc,good.png,fine\n',
        encoding="utf-8",
    )
    data = load(root)
    assert data.ids == ["a", "c"] and data.listed == 3
    assert len(data.rejected) == 1
    assert data.rejected[0].pair.startswith("line 4: ")  # header 1, the quoted record 2-3
    assert "expected 3 comma-separated fields, got 4" in data.rejected[0].reason


def test_csv_header_without_a_required_column_is_an_input_error(root: Path) -> None:
    (root / "pairs.csv").write_text("id,image\na,good.png\n", encoding="utf-8")
    with pytest.raises(InputError, match="header row naming id, image and text"):
        load(root)


def test_both_files_present_is_an_input_error(root: Path) -> None:
    write_jsonl(root, [GOOD_BEFORE])
    (root / "pairs.csv").write_text("id,image,text\na,good.png,t\n", encoding="utf-8")
    with pytest.raises(InputError, match="got both"):
        load(root)


def test_no_pairs_file_is_an_input_error_naming_both(root: Path) -> None:
    with pytest.raises(InputError, match=r"pairs\.jsonl'.* or .*pairs\.csv'"):
        load(root)


def test_nothing_loadable_says_how_many_were_rejected_and_the_first_reason(root: Path) -> None:
    write_jsonl(root, [{"id": "a", "image": "good.png"}, {"id": "b", "image": "absent.png"}])
    with pytest.raises(InputError, match="2 rejected; first: line 1: .*missing text"):
        load(root)


def test_evaluate_without_queries_is_an_input_error(root: Path) -> None:
    write_jsonl(root, [GOOD_BEFORE, GOOD_AFTER])
    data = load(root)
    rng = np.random.default_rng(0)
    data = data.with_features(
        image=rng.random((2, 8)), text=rng.random((2, 8)), image_backbone="test", vocabulary=None
    )
    with pytest.raises(InputError, match=r'expected query pairs \(split "query"\) to evaluate'):
        evaluate_methods(data, methods=parse_methods("lsh"), bits=[16], seeds=[0])


def test_cmh_data_check_reports_the_rejected_lines(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(
        root,
        [GOOD_BEFORE, {"id": "x", "image": "absent.png", "text": "t"}, "{", GOOD_AFTER],
    )
    assert main(["data", "check", "--dataset", "pairs", "--root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dataset"] == "pairs"
    assert (report["listed"], report["loaded"], report["rejected"]) == (4, 2, 2)
    assert [r["pair"][:7] for r in report["rejections"]] == ["line 2:", "line 3:"]
    assert report["rejection_kinds"] == {"missing image file": 1, "malformed line": 1}
    assert report["splits"] == {"train": 2, "query": 0, "database": 2}
