"""The tutorials are part of the specification: each notebook runs top to bottom.

Every tutorials/NN_*.ipynb is executed in a fresh Jupyter kernel (the venv's "python3",
registered by `make setup` with `ipykernel install --sys-prefix`), with tutorials/ as its
working directory, and must finish without an error: its exercises end in real asserts,
so a notebook that runs is a notebook whose checks pass. The kernel inherits this
process's environment, so TRITON_INTERPRET=1 and HF_HUB_OFFLINE=1 (tests/conftest.py)
hold inside it too.

The fast tests below check what is committed: notebooks are stored without outputs, are
valid, end with exercises, and are all on the documentation site.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
NOTEBOOK_IDS = [path.name for path in NOTEBOOKS]

#: seconds one notebook may take in total (they are written to take well under 60 s)
NOTEBOOK_TIME_LIMIT = 300


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_there_are_tutorials() -> None:
    assert NOTEBOOKS, f"no tutorials/NN_*.ipynb found in {TUTORIALS}"


def test_tutorials_are_numbered_without_gaps() -> None:
    numbers = [int(path.name[:2]) for path in NOTEBOOKS]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_committed_notebook_has_no_outputs_or_execution_counts(path: Path) -> None:
    nb = _read(path)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; "
                       "clear them before committing (Kernel > Restart & Clear Output)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_is_valid_and_uses_the_python3_kernel(path: Path) -> None:
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_opens_with_a_title_and_ends_with_exercises_checked_by_asserts(path: Path) -> None:
    nb = _read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), \
        f"{path.name} must open with a markdown title"
    headings = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
                and re.search(r"^#+ .*Exercises", cell.source, re.MULTILINE)]
    assert headings, f"{path.name} has no 'Exercises' section"
    after = nb.cells[headings[-1] + 1:]
    assert any(cell.cell_type == "code" and re.search(r"^\s*assert\b", cell.source, re.MULTILINE)
               for cell in after), f"{path.name}: the exercises must be checked by asserts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_is_in_the_documentation_nav(path: Path) -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert f"tutorials/{path.name}" in nav, f"add tutorials/{path.name} to the nav in mkdocs.yml"


def _kernel_name() -> str:
    """The kernel to run notebooks in: "python3", checked to be this interpreter.

    `make setup` registers the venv's kernel under the venv's prefix; without it,
    jupyter_client falls back to ipykernel's built-in spec, which also runs
    sys.executable. Anything else (a "python3" kernel of another Python found first on
    the Jupyter path) would test the wrong environment, so it fails loudly here.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    exe = spec.argv[0]
    if exe not in ("python", "python3", "{python}") and Path(exe).resolve() != Path(sys.executable).resolve():
        pytest.fail(f"the 'python3' Jupyter kernel runs {exe}, not {sys.executable}; run "
                    f"`{sys.executable} -m ipykernel install --sys-prefix --name python3`")
    return "python3"


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_TIME_LIMIT + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_tutorial_runs_top_to_bottom(path: Path) -> None:
    from nbclient import NotebookClient

    nb = _read(path)
    client = NotebookClient(
        nb,
        kernel_name=_kernel_name(),
        timeout=NOTEBOOK_TIME_LIMIT,          # per cell; the pytest timeout bounds the whole
        allow_errors=False,
        resources={"metadata": {"path": str(TUTORIALS)}},   # cwd of the kernel
    )
    client.execute()     # raises CellExecutionError, with the failing cell, on any error
