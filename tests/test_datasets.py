"""Dataset loaders: the real Wikipedia and Web News data, and small files in every layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from common.errors import InputError
from models.data.demo import KINDS, generate_demo, load_demo
from models.data.loaders import load_dataset, summarize


def test_wikipedia_training_part(wikipedia_root: Path) -> None:
    data = load_dataset("wikipedia", wikipedia_root)
    report = summarize(data)
    assert report["listed"] == report["loaded"] == 2173
    assert report["n_labels"] == 10 and data.label_names[0] == "art"
    assert data.image_features is not None and data.image_features.shape == (2173, 128)
    assert data.text_features is not None and data.text_features.shape == (2173, 10)
    assert (data.labels.sum(axis=1) == 1).all()
    # development split: 20% seeded queries, disjoint from database = train
    assert data.split_sizes() == {"train": 1738, "query": 435, "database": 1738}
    assert not set(data.query_idx) & set(data.database_idx)
    again = load_dataset("wikipedia", wikipedia_root, seed=0)
    assert np.array_equal(again.query_idx, data.query_idx)
    assert not np.array_equal(
        load_dataset("wikipedia", wikipedia_root, seed=1).query_idx, data.query_idx
    )


def _write_wikipedia(root: Path, n_train: int, n_test: int, rng: np.random.Generator) -> None:
    root.mkdir()
    (root / "categories.list").write_text("\n".join(f"c{i}" for i in range(1, 11)))
    mat = {"I_tr": rng.random((n_train, 128)), "T_tr": rng.random((n_train, 10))}
    if n_test:
        mat |= {"I_te": rng.random((n_test, 128)), "T_te": rng.random((n_test, 10))}
    scipy.io.savemat(root / "raw_features.mat", mat)
    for name, n in (("trainset", n_train), ("testset", n_test)):
        lines = [f"t{name}{i}\ti{name}{i}\t{1 + i % 10}" for i in range(n)]
        (root / f"{name}_txt_img_cat.list").write_text("\n".join(lines))


def test_wikipedia_with_test_variables_uses_test_pairs_as_queries(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    _write_wikipedia(tmp_path / "wiki", 50, 20, rng)
    data = load_dataset("wikipedia", tmp_path / "wiki")
    assert len(data) == 70
    assert np.array_equal(data.query_idx, np.arange(50, 70))
    assert np.array_equal(data.database_idx, np.arange(50))
    assert np.array_equal(data.train_idx, data.database_idx)
    assert "test pairs" in data.protocol


def test_wikipedia_row_mismatch_is_an_input_error(tmp_path: Path, rng: np.random.Generator) -> None:
    _write_wikipedia(tmp_path / "wiki", 50, 0, rng)
    lines = (tmp_path / "wiki" / "trainset_txt_img_cat.list").read_text().splitlines()
    (tmp_path / "wiki" / "trainset_txt_img_cat.list").write_text("\n".join(lines[:-1]))
    with pytest.raises(InputError, match="equal rows"):
        load_dataset("wikipedia", tmp_path / "wiki")


@pytest.mark.parametrize("name", ["wikipedia", "web-news", "demo", "mirflickr25k"])
def test_missing_root_is_an_input_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="expected"):
        load_dataset(name, tmp_path / "absent")


def test_unknown_dataset_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a dataset in"):
        load_dataset("cifar", tmp_path)


def test_web_news_accounts_for_every_listed_pair(web_news_root: Path) -> None:
    data = load_dataset("web-news", web_news_root)
    report = summarize(data)
    assert report["listed"] == 2200
    assert report["loaded"] + report["rejected"] == 2200
    assert report["rejected"] == 7 and report["n_labels"] == 10
    assert all("image not found" in r.reason for r in data.rejected)
    reasons = " | ".join(d.reason for d in data.defects)
    assert "found as culture/'22 .jpg'" in reasons  # a file name with a trailing space
    assert "identical content" in reasons  # the same photo in two category folders
    assert "colour mode CMYK" in reasons and "is PNG, not JPEG" in reasons
    assert data.split_sizes()["query"] + data.split_sizes()["train"] == 2193


def _write_web_news(root: Path) -> None:
    """A small Web News tree with one of each defect the loader must account for."""
    cats = ["culture", "sports"]
    for c in cats:
        (root / "images" / c).mkdir(parents=True)
    (root / "texts").mkdir()
    (root / "categories.list").write_text("\n".join(cats))
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    for i in range(1, 7):
        rgb.save(root / "images" / "culture" / f"{i}.jpg")
        (root / "texts" / f"{i}.txt").write_text(f"文化新闻 第{i}条", encoding="utf-8")
    rgb.save(root / "images" / "culture" / "7 .jpg")  # trailing space in the file name
    Image.new("CMYK", (40, 30)).save(root / "images" / "sports" / "8.jpg")
    Image.new("RGBA", (40, 30)).save(root / "images" / "sports" / "9.jpg", format="PNG")
    (root / "images" / "sports" / "10.jpg").write_bytes(b"not an image")
    for i in (7, 8, 9, 10):
        (root / "texts" / f"{i}.txt").write_text("体育 比赛", encoding="utf-8")
    (root / "texts" / "5.txt").write_text("  ", encoding="utf-8")  # empty caption
    (root / "texts" / "6.txt").write_bytes(b"\xff\xfe bad")  # not UTF-8
    train = ["1\t1\t1", "2\t2\t1", "2\t2\t1", "3\t3\t9", "4\t4", "5\t5\t1", "6\t6\t1", "7\t7\t1"]
    test = ["8\t8\t2", "9\t9\t2", "10\t10\t2", "11\t11\t2"]
    (root / "trainset_txt_img_cat.list").write_text("\n".join(train))
    (root / "testset_txt_img_cat.list").write_text("\n".join(test) + "\n")


def test_web_news_defects_are_each_reported(tmp_path: Path) -> None:
    _write_web_news(tmp_path)
    data = load_dataset("web-news", tmp_path)
    assert data.listed == 12 and len(data) + len(data.rejected) == 12
    assert sorted(data.ids) == ["1", "2", "7", "8", "9"]
    reasons = {
        r.pair.split(":")[0] + ":" + r.pair.split("line ")[1].split(":")[0]: r.reason
        for r in data.rejected
    }
    assert "duplicate" in reasons["trainset_txt_img_cat.list line 3:3"]
    assert "category in 1..2" in reasons["trainset_txt_img_cat.list line 4:4"]
    assert "3 tab-separated fields" in reasons["trainset_txt_img_cat.list line 5:5"]
    assert "is empty" in reasons["trainset_txt_img_cat.list line 6:6"]
    assert "not UTF-8" in reasons["trainset_txt_img_cat.list line 7:7"]
    assert "could not decode" in reasons["testset_txt_img_cat.list line 3:3"]
    assert "image not found" in reasons["testset_txt_img_cat.list line 4:4"]
    defects = " | ".join(d.reason for d in data.defects)
    assert "'7 .jpg'" in defects and "CMYK" in defects and "PNG, not JPEG" in defects
    assert data.split_sizes() == {"train": 3, "query": 2, "database": 3}


def _paper_arrays(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "XAll": rng.random((n, 16)).astype(np.float32),
        "YAll": (rng.random((n, 12)) < 0.2).astype(np.float64),
        "LAll": (rng.random((n, 24)) < 0.1).astype(np.float64),
    }


@pytest.mark.parametrize("hdf5", [False, True])
def test_mirflickr_feature_layout(tmp_path: Path, rng: np.random.Generator, hdf5: bool) -> None:
    base = tmp_path / "MIRFLICKR25K"
    base.mkdir()
    arrays = _paper_arrays(2100, rng)
    files = {
        "XAll": "mirflickr25k-iall-vgg.mat",
        "YAll": "mirflickr25k-yall.mat",
        "LAll": "mirflickr25k-lall.mat",
    }
    for var, filename in files.items():
        if hdf5:  # MATLAB v7.3 stores column-major: h5py sees the transpose
            with h5py.File(base / filename, "w") as f:
                f[var] = arrays[var].T
        else:
            scipy.io.savemat(base / filename, {var: arrays[var]})
    data = load_dataset("mirflickr25k", tmp_path, seed=3)
    assert data.split_sizes() == {"train": 100, "query": 2000, "database": 100}
    assert data.image_features is not None
    np.testing.assert_allclose(data.image_features, arrays["XAll"])
    assert data.labels.shape == (2100, 24) and data.labels.dtype == np.uint8
    assert "seed 3" in data.protocol


def test_nus_wide_uses_2100_queries(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = _paper_arrays(2300, rng)
    names = {
        "XAll": "nus-wide-tc10-xall-vgg.mat",
        "YAll": "nus-wide-tc10-yall.mat",
        "LAll": "nus-wide-tc10-lall.mat",
    }
    for var, filename in names.items():
        scipy.io.savemat(tmp_path / filename, {var: arrays[var]})
    data = load_dataset("nus-wide", tmp_path)
    assert data.split_sizes()["query"] == 2100


def test_iapr_pools_database_and_test_then_splits(tmp_path: Path, rng: np.random.Generator) -> None:
    mat = {
        "VDatabase": rng.random((1500, 8)),
        "YDatabase": rng.random((1500, 5)),
        "databaseL": (rng.random((1500, 255)) < 0.05).astype(float),
        "VTest": rng.random((600, 8)),
        "YTest": rng.random((600, 5)),
        "testL": (rng.random((600, 255)) < 0.05).astype(float),
    }
    scipy.io.savemat(tmp_path / "iapr-tc12-rand.mat", mat)
    data = load_dataset("iapr-tc12", tmp_path)
    assert len(data) == 2100 and data.split_sizes()["query"] == 2000


def test_paper_layout_missing_variable_is_an_input_error(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    scipy.io.savemat(tmp_path / "mirflickr25k-iall-vgg.mat", {"wrong": rng.random((3, 3))})
    with pytest.raises(InputError, match="XAll"):
        load_dataset("mirflickr25k", tmp_path)


def test_demo_is_deterministic_and_captions_name_the_labels(
    demo_root: Path, tmp_path: Path
) -> None:
    again = generate_demo(tmp_path / "again", n=80, seed=0)
    assert (again / "captions.jsonl").read_bytes() == (demo_root / "captions.jsonl").read_bytes()
    assert (again / "images" / "00007.jpg").read_bytes() == (
        demo_root / "images" / "00007.jpg"
    ).read_bytes()
    data = load_demo(demo_root)
    assert len(data) == 80 and data.label_names == list(KINDS)
    assert data.split_sizes() == {"train": 72, "query": 8, "database": 72}
    assert data.texts is not None
    for text, row in zip(data.texts, data.labels, strict=True):
        named = {k for k in KINDS if f" {k} " in f" {text.replace(',', ' ')} "}
        assert named == {KINDS[j] for j in np.flatnonzero(row)}


def test_demo_rejects_a_missing_image(demo_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_root, copy)
    (copy / "images" / "00003.jpg").unlink()
    with (copy / "captions.jsonl").open("a") as f:
        f.write(json.dumps({"id": "x"}) + "\n")
    data = load_demo(copy)
    assert len(data) == 79 and data.listed == 81
    assert [r.reason.split(":")[0] for r in data.rejected] == [
        "image not found",
        "malformed record",
    ]
