"""`minipaged bench NAME [ARGS]`: run one of the benchmarks behind docs/results.md.

The benchmarks live in `benchmarks/` (installed as `minipaged.benchmarks`); each that
defines `main(argv)` is a command, and everything after its name is its own argument
list, so `minipaged bench memory --smoke` equals `python -m benchmarks.memory --smoke`.

Invariant: a name that is not a benchmark is a usage error (ValueError, which the
command line turns into exit status 2) that lists the names there are; nothing runs.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from pathlib import Path


def benchmark_names() -> list[str]:
    """Modules of minipaged.benchmarks that define main() (helpers like common.py do not)."""
    try:
        import minipaged.benchmarks as pkg
    except ImportError:
        return []
    names = []
    for m in pkgutil.iter_modules(pkg.__path__):
        path = Path(m.module_finder.path) / f"{m.name}.py"
        if m.name.startswith("_") or not path.is_file():
            continue
        if re.search(r"^def main\(", path.read_text(encoding="utf-8"), re.MULTILINE):
            names.append(m.name)
    return sorted(names)


def cmd_bench(args: argparse.Namespace) -> int:
    """List the benchmarks (args.list) or run args.name with args.args; its exit status."""
    names = benchmark_names()
    if args.list or not args.name:
        if not args.list:
            raise ValueError("bench: name a benchmark (see `minipaged bench --list`)")
        print("\n".join(names))
        return 0
    if args.name not in names:
        raise ValueError(f"bench: unknown benchmark {args.name!r}; available: "
                         f"{', '.join(names) or 'none'}")
    module = importlib.import_module(f"minipaged.benchmarks.{args.name}")
    if not hasattr(module, "main"):
        raise ValueError(f"bench: minipaged.benchmarks.{args.name} has no main(argv)")
    # the benchmark's usage line names the command that ran it
    saved, sys.argv[0] = sys.argv[0], f"minipaged bench {args.name}"
    try:
        return int(module.main(list(args.args)) or 0)
    finally:
        sys.argv[0] = saved
