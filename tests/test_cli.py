"""The `cmh` command line: exit codes and messages. One test runs the real entry point in a
subprocess (`python -m cli`); the others call `main()` in this process, which runs the same
code without paying a fresh torch import per test."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.main import build_parser, main


def cmh_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`cmh ARGS` as a user runs it: a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=300
    )


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cmh(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """`cmh ARGS` in this process: main()'s exit code and what it printed."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def _subcommand_paths() -> list[list[str]]:
    """Every subcommand path, e.g. ["data", "check"], found from the parser itself."""
    paths: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append(prefix + [name])
                    walk(sub, prefix + [name])

    walk(build_parser(), [])
    return paths


@pytest.mark.parametrize("path", _subcommand_paths(), ids=" ".join)
def test_every_subcommand_has_help(path: list[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*path, "--help"])
    assert exit_info.value.code == 0


def test_help_lists_every_command_and_each_parses_alone(cmh: Callable[..., Ran]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cmh("--help")
    assert exit_info.value.code == 0
    for path in _subcommand_paths():
        with pytest.raises(SystemExit) as exit_info:
            build_parser([*path, "--help"]).parse_args([*path, "--help"])
        assert exit_info.value.code == 0, path


def test_serve_imports_neither_benchmark_nor_training_code(tmp_path: Path) -> None:
    # cmh imports only the module of the command it runs: serving loads the service, not
    # bench/ (FAISS, wrk drivers) nor the training and baselines the other commands need.
    code = (
        "import sys; from cli.main import main; "
        "code = main(['serve', '--artifacts', sys.argv[1]]); "
        "print(code, ' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    returncode, *modules = result.stdout.split()
    assert returncode == "2" and "expected a checkpoint" in result.stderr  # it ran, and refused
    assert "cli.serve" in modules and "service.app" in modules
    loaded = [m for m in modules if m.split(".")[0] in ("bench", "faiss") or "training" in m]
    assert loaded == [] and "cli.bench" not in modules


def test_missing_root_exits_2_with_one_line(tmp_path: Path) -> None:
    result = cmh_process(
        "data", "check", "--dataset", "web-news", "--root", str(tmp_path / "absent")
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "expected web-news root to be a directory" in lines[0]


def test_malformed_root_exits_2(tmp_path: Path, cmh: Callable[..., Ran]) -> None:
    result = cmh("data", "check", "--dataset", "wikipedia", "--root", str(tmp_path))
    assert result.returncode == 2 and "raw_features.mat" in result.stderr


def test_data_check_json_on_web_news(web_news_root: Path, cmh: Callable[..., Ran]) -> None:
    result = cmh("data", "check", "--dataset", "web-news", "--root", str(web_news_root), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["listed"] == 2200 and report["loaded"] + report["rejected"] == 2200
    assert report["n_labels"] == 10 and len(report["rejections"]) == report["rejected"]
    assert all(r["reason"] for r in report["rejections"])


def test_data_check_on_wikipedia(wikipedia_root: Path, cmh: Callable[..., Ran]) -> None:
    result = cmh("data", "check", "--dataset", "wikipedia", "--root", str(wikipedia_root), "--json")
    report = json.loads(result.stdout)
    assert report["loaded"] == 2173 and report["n_labels"] == 10


def test_features_twice_reads_the_cache(
    demo_root: Path, tmp_path: Path, cmh: Callable[..., Ran]
) -> None:
    args = [
        "features",
        "--dataset",
        "demo",
        "--root",
        str(demo_root),
        "--cache-dir",
        str(tmp_path),
        "--json",
    ]
    first = json.loads(cmh(*args).stdout)
    second = json.loads(cmh(*args).stdout)
    assert first["cache_hit"] is False and second["cache_hit"] is True
    assert first["image_dim"] == 1280 and first["images_per_second"] > 0


def test_vgg19_without_weights_exits_2(tiny_demo_root: Path, cmh: Callable[..., Ran]) -> None:
    result = cmh(
        "features", "--dataset", "demo", "--root", str(tiny_demo_root), "--backbone", "vgg19"
    )
    assert result.returncode == 2 and "--weights" in result.stderr


def test_serve_refuses_worker_counts_it_cannot_run(cmh: Callable[..., Ran], tmp_path: Path) -> None:
    refused = cmh("serve", "--artifacts", str(tmp_path), "--workers", "0")
    assert refused.returncode == 2
    assert "expected --workers of at least 1, got 0" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_train_flags_set_the_options_beyond_the_paper() -> None:
    from cli.main import build_parser
    from cli.train import config_from_args

    base = [
        "train",
        "--dataset",
        "demo",
        "--root",
        "demo",
        "--out",
        "model.pt",
        "--method",
        "aucmh",
    ]
    default = config_from_args(build_parser().parse_args(base))
    assert (default.lr_schedule, default.hash_temperature) == ("constant", 1.0)
    flags = ["--lr-schedule", "cosine", "--hash-temperature", "2"]
    chosen = config_from_args(build_parser().parse_args(base + flags))
    assert (chosen.lr_schedule, chosen.hash_temperature) == ("cosine", 2.0)
    assert default.graph_fusion == "mean"
    fused = config_from_args(build_parser().parse_args([*base, "--graph-fusion", "product"]))
    assert fused.graph_fusion == "product"
    assert default.graph_text_weight == 0.5
    leaning = config_from_args(build_parser().parse_args([*base, "--graph-text-weight", "0.7"]))
    assert leaning.graph_text_weight == 0.7
