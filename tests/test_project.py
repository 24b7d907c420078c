"""The project around the code, as the README tells a user and a developer to use it: the make
targets it documents, constraints.txt within pyproject.toml's ranges, and a bare `pytest`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def constraints() -> dict[str, str]:
    """Canonical name -> the exact version constraints.txt pins."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"expected name==version in constraints.txt, got {line!r}"
            pins[canonicalize_name(name)] = pinned
    return pins


def requirements() -> list[Requirement]:
    """Every requirement of pyproject.toml, dev extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(spec) for spec in specs]


def test_pyproject_states_ranges_and_constraints_pin_each_within_its_range() -> None:
    pins = constraints()
    for req in requirements():
        assert not any(s.operator == "==" for s in req.specifier), f"{req}: a range, not a pin"
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} outside {req}"


def test_the_environment_has_exactly_what_constraints_pin() -> None:
    # make installs with -c constraints.txt, so what CI tests is what the file says.
    pins = constraints()
    for req in requirements():
        try:
            installed = version(req.name)
        except PackageNotFoundError:  # a dev extra that this environment was not given
            continue
        assert installed == pins[canonicalize_name(req.name)], req.name


def test_requires_python_admits_3_11_to_3_13() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = Requirement(f"python{project['requires-python']}").specifier
    assert [v for v in ("3.10", "3.11", "3.12", "3.13", "3.14") if spec.contains(v)] == [
        "3.11",
        "3.12",
        "3.13",
    ]


def make_dry_run(*args: str, install: bool = False) -> str:
    """`make -n ARGS` in the project root: what it would run (not the install, unless asked)."""
    keep = [] if install else ["-o", ".venv/.installed-stamp"]
    result = subprocess.run(
        ["make", "-n", *keep, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_make_serve_listens_where_host_and_port_say() -> None:
    assert "--host 127.0.0.1 --port 8000" in make_dry_run("serve")
    assert "--host 0.0.0.0 --port 9000" in make_dry_run("serve", "HOST=0.0.0.0", "PORT=9000")


def test_make_test_is_the_full_suite_with_its_slowest_and_test_fast_leaves_out_slow() -> None:
    full = [line for line in make_dry_run("test").splitlines() if "pytest" in line]
    assert len(full) == 1 and "--durations=25" in full[0] and "slow" not in full[0]
    fast = [line for line in make_dry_run("test-fast").splitlines() if "pytest" in line]
    assert len(fast) == 1 and re.search(r"-m '?not slow'?", fast[0])


def test_make_installs_from_the_constraints() -> None:
    install = make_dry_run("-B", ".venv/.installed-stamp", install=True)
    assert "pip install --progress-bar on -c constraints.txt -e '.[dev]'" in install
    assert "--quiet" not in install


def test_a_bare_pytest_from_the_root_imports_tests_helpers() -> None:
    # No PYTHONPATH and not `python -m pytest` (which puts the working folder on sys.path):
    # pyproject's pytest `pythonpath` is what lets tests import tests.helpers.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pytest = Path(sys.executable).parent / "pytest"
    result = subprocess.run(
        [
            str(pytest),
            "--collect-only",
            "-q",
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "tests/test_hamming.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tests/test_hamming.py::" in result.stdout


def test_every_module_over_400_lines_says_why_in_its_docstring() -> None:
    # Issue 34: a long module is a choice to explain, at its top, not an accident.
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    unexplained = []
    for name in files:
        text = (ROOT / name).read_text(encoding="utf-8")
        if text.count("\n") > 400:
            docstring = text.split('"""')[1] if text.lstrip().startswith('"""') else ""
            if "Over 400 lines because" not in docstring:
                unexplained.append(name)
    assert unexplained == []
