"""Shared fixtures: the real data folder (skipped with a reason when absent), small datasets and
a real milvus-lite gRPC server process (one a test can kill -9 and start again)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cli.demo_artifacts import build_demo
from models.data.dataset import PairDataset
from models.data.demo import generate_demo
from models.features.pipeline import prepare
from store.milvus_lite import MilvusLite

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """The path of ../shared/data/<name>, or skip: a user's fresh clone has no ../shared."""
    path = (SHARED_DATA / name).resolve()
    if not path.is_dir():
        pytest.skip(f"real data {name!r} not found at {path} (only CI and developers have it)")
    return path


@pytest.fixture(scope="session")
def wikipedia_root() -> Path:
    """The real Wikipedia training part."""
    return shared_dataset("wikipedia")


@pytest.fixture(scope="session")
def web_news_root() -> Path:
    """The real Web News raw folders."""
    return shared_dataset("web-news")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated demo dataset (80 scenes), shared by the tests of a session."""
    return generate_demo(tmp_path_factory.mktemp("demo") / "demo", n=80, seed=0)


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest demo (20 scenes), for tests that extract features several times."""
    return generate_demo(tmp_path_factory.mktemp("tiny") / "demo", n=20, seed=1)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the session, so each image set is extracted once."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="session")
def demo_data(demo_root: Path, feature_cache: Path) -> PairDataset:
    """The small demo with real EfficientNet-Lite0 image features and BoW text, extracted once."""
    return prepare("demo", demo_root, cache_dir=feature_cache)


@pytest.fixture(scope="session")
def demo_artifacts_master(
    demo_root: Path,
    demo_data: PairDataset,
    feature_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """Artifacts built from the small demo (a briefly trained checkpoint and its index); read-only."""
    artifacts = tmp_path_factory.mktemp("artifacts-master")
    shutil.copytree(demo_root, artifacts / "demo")
    shutil.copytree(feature_cache, artifacts / "features")
    build_demo(artifacts, epochs=3)
    return artifacts


@pytest.fixture
def demo_artifacts(demo_artifacts_master: Path, tmp_path: Path) -> Path:
    """A private copy of the demo artifacts, for a test that may change them."""
    return Path(shutil.copytree(demo_artifacts_master, tmp_path / "artifacts"))


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(0)


@pytest.fixture
def milvus_lite(tmp_path: Path) -> Iterator[MilvusLite]:
    """A fresh milvus-lite server for one test, killed at its end."""
    server = MilvusLite(tmp_path / "milvus.db")
    server.start()
    try:
        yield server
    finally:
        server.kill()
