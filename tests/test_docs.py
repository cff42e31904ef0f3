"""The documentation site builds, strictly, and documents what exists.

`mkdocs build --strict` turns every warning into an error: a broken link, a page missing
from the nav's targets, an API reference entry that names a module that does not exist.
The build runs into a temporary directory, never into site/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_docs_build_strict_without_warnings(tmp_path: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def _api_reference_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs" / "api").glob("*.md")))


@pytest.mark.parametrize("module", sorted(
    p.stem for p in (ROOT / "minipaged" / "core").glob("*.py") if not p.name.startswith("_")))
def test_every_core_module_is_in_the_api_reference(module: str) -> None:
    assert f"::: minipaged.core.{module}" in _api_reference_text(), \
        f"add `::: minipaged.core.{module}` to docs/api/core.md"


@pytest.mark.parametrize("module", sorted(
    p.stem for p in (ROOT / "kernels").glob("*.py") if not p.name.startswith("_")))
def test_every_kernel_module_is_in_the_api_reference(module: str) -> None:
    assert f"::: minipaged.kernels.{module}" in _api_reference_text(), \
        f"add `::: minipaged.kernels.{module}` to docs/api/kernels.md"


def test_docs_tutorials_link_points_at_the_tutorials_folder() -> None:
    link = ROOT / "docs" / "tutorials"
    assert link.is_symlink() and link.resolve() == (ROOT / "tutorials").resolve()


def test_every_test_named_on_the_specification_page_exists() -> None:
    """docs/tests.md maps invariants to tests: each name it gives must be a real test.

    In each table cell, `file.py::name` names a test of that file, and a bare `test_name`
    that follows refers to the same file.
    """
    import re

    page = (ROOT / "docs" / "tests.md").read_text(encoding="utf-8")
    missing = []
    for row in page.splitlines():
        if not row.startswith("|"):
            continue
        current = None
        for token in re.findall(r"`([^`]+)`", row):
            if "::" in token:
                filename, name = token.split("::", 1)
                current = ROOT / "tests" / filename
                if not current.is_file():
                    missing.append(token)
                    continue
                name = name.split(".")[-1]
            elif token.startswith("test_") and current is not None:
                name = token
            else:
                continue
            if not re.search(rf"\b{re.escape(name)}\b", current.read_text(encoding="utf-8")):
                missing.append(f"{current.name}::{name}")
    assert not missing, f"docs/tests.md names tests that do not exist: {missing}"
