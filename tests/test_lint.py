"""Lint and types are part of the suite: ``ruff check`` over the code and ``mypy`` with
the project's configuration ([tool.mypy] in pyproject.toml: strict, on sheri_trio).

Both run as subprocesses of this interpreter from the checkout that holds this file;
they are skipped when that checkout or the tools (the ``test`` extra) are not there.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTED = ("sheri_trio", "tests", "bench")

pytestmark = [
    pytest.mark.lint,
    pytest.mark.skipif(
        not (ROOT / "pyproject.toml").is_file() or not (ROOT / "sheri_trio").is_dir(),
        reason=f"not run from a source checkout ({ROOT} has no pyproject.toml/sheri_trio)",
    ),
]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed for {sys.executable} (pip install -e '.[test]')")
    return subprocess.run(
        [sys.executable, "-m", tool, *args],
        cwd=ROOT,  # the project's config, and its caches (.ruff_cache, .mypy_cache) there
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_check() -> None:
    result = _run("ruff", "check", "--output-format=concise", *LINTED)
    returncode = result.returncode
    assert returncode == 0, f"ruff check {' '.join(LINTED)}:\n{result.stdout}{result.stderr}"


@pytest.mark.slow
def test_mypy() -> None:
    result = _run("mypy")  # files and strictness from [tool.mypy]
    returncode = result.returncode
    assert returncode == 0, f"mypy:\n{result.stdout}{result.stderr}"
