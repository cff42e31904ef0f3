"""A Griffe extension for the API reference: document kernels/ as `minipaged.kernels`.

The folder kernels/ sits at the top of the repository but is installed under the import
name `minipaged.kernels` (a `package-dir` mapping in pyproject.toml). Griffe reads source
statically and looks for minipaged/kernels/, which does not exist. When the `minipaged`
package has been loaded, this extension parses kernels/*.py (statically: nothing is
imported, so Triton is not needed to build the docs) and attaches the result as the
submodule `kernels` of `minipaged`, so `::: minipaged.kernels.reference` works.

It is enabled in mkdocs.yml (mkdocstrings > handlers > python > options > extensions);
mkdocs itself does not publish this folder (exclude_docs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe


class KernelsAsSubpackage(griffe.Extension):
    """Attach the top-level folder kernels/ to the `minipaged` package as `minipaged.kernels`."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "minipaged" or "kernels" in pkg.members or pkg.filepath is None:
            return
        package_dir = Path(pkg.filepath).parent          # .../minipaged/__init__.py -> .../minipaged
        kernels_dir = package_dir.parent / "kernels"
        if not (kernels_dir / "__init__.py").is_file():
            return
        kernels = self._visit(loader, "kernels", kernels_dir / "__init__.py", parent=pkg)
        pkg.set_member("kernels", kernels)
        for path in sorted(kernels_dir.glob("*.py")):
            if path.name == "__init__.py":
                continue
            kernels.set_member(path.stem, self._visit(loader, path.stem, path, parent=kernels))

    @staticmethod
    def _visit(loader: griffe.GriffeLoader, name: str, path: Path,
               parent: griffe.Module) -> griffe.Module:
        code = path.read_text(encoding="utf-8-sig")
        loader.lines_collection[path] = code.splitlines(keepends=False)   # for "show source"
        return griffe.visit(name, filepath=path, code=code, parent=parent,
                            extensions=loader.extensions,
                            docstring_parser=loader.docstring_parser,
                            docstring_options=loader.docstring_options,
                            lines_collection=loader.lines_collection,
                            modules_collection=loader.modules_collection)
