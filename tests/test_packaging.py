"""The repository's top-level folders behave when the repository itself is on sys.path
(`python -m ...` run from it, as `make demo` and `make test` do): `kernels/` is installed
as `minipaged.kernels` and must not pass itself off as the PyPI package `kernels`, which
transformers imports when it is installed."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_from_repo(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as `python -m` does
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_a_top_level_import_of_kernels_from_the_repository_gets_the_pypi_package():
    r = _run_from_repo("import kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    ours = Path(r.stdout.strip()).resolve().is_relative_to(REPO / "kernels")
    # without the PyPI package the folder stays itself: transformers' probe imports the
    # name and finds no version, as it did before transformers wanted that package
    assert ours != _pypi_kernels_installed()


def test_without_the_pypi_package_the_folder_stays_itself(tmp_path):
    # a fresh interpreter that cannot see site-packages: no PyPI `kernels` to hand over to
    r = subprocess.run([sys.executable, "-S", "-c",
                        "import kernels; print(kernels.__file__)"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve() == REPO / "kernels" / "__init__.py"


def test_transformers_activations_import_from_the_repository():
    # transformers' hub-kernels integration does `from kernels import ...` at import time
    r = _run_from_repo("import transformers.activations, minipaged.kernels.reference")
    assert r.returncode == 0, r.stderr


def test_minipaged_kernels_is_the_repositorys_kernels_folder():
    import minipaged.kernels

    assert Path(minipaged.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
