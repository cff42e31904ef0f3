"""A MkDocs hook that fills the Results page from what the benchmarks wrote.

Each benchmark (`python -m benchmarks.NAME`) writes its output into docs/results/ as
NAME.md (a ready-made section: its tables, then the command, the machine and the notes of
the run), and/or NAME.csv (the full table) and NAME.png (a plot). The Results page
(docs/results.md) holds markers

    <!-- results: NAME [NAME ...] -->

and this hook replaces each marker, at build time, with what exists for those names:

- the plot (NAME.png or NAME.svg), unless the .md already shows it;
- the .md included as is (its relative links made relative to the Results page), or,
  without an .md, the .csv as a Markdown table;
- a download link to the .csv, and to each companion table NAME_*.csv.

A name with no output yet becomes the line "Not measured yet", so the page never claims a
number that no benchmark produced. Output files that no marker names are listed at the
end under "Other results", so nothing a benchmark writes is silently left out.

Enabled in mkdocs.yml under `hooks:`; MkDocs does not publish this folder (exclude_docs).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

MARKER = re.compile(r"<!--\s*results:\s*([\w\s-]+?)\s*-->")
RELATIVE_LINK = re.compile(r"(\]\()(?![a-z]+:|/|#)([^)\s]+)")
OUTPUT_SUFFIXES = (".md", ".csv", ".png", ".svg")


def _results_dir(config) -> Path:
    return Path(config["docs_dir"]) / "results"


def _csv_table(path: Path) -> str:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""
    header, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _section(results: Path, name: str) -> tuple[str, set[str]]:
    """The Markdown for one benchmark name, and the output files it used."""
    used: set[str] = set()
    md, table = results / f"{name}.md", results / f"{name}.csv"
    plots = [p for p in (results / f"{name}.png", results / f"{name}.svg") if p.is_file()]
    text = RELATIVE_LINK.sub(r"\1results/\2", md.read_text(encoding="utf-8")) if md.is_file() else ""
    parts: list[str] = []
    for plot in plots:
        used.add(plot.name)
        if f"results/{plot.name}" not in text:          # an .md may embed its own plot
            parts.append(f"![{name}](results/{plot.name})")
    if md.is_file():
        parts.append(text.strip())
        used.add(md.name)
    elif table.is_file():
        parts.append(_csv_table(table))
    # the main table, then companion tables (NAME_*.csv, e.g. throughput_identity.csv),
    # which the .md already shows: offered for download, not listed as "other results"
    companions = [c for c in sorted(results.glob(f"{name}_*.csv"))
                  if not c.with_suffix(".md").is_file()]    # one with an .md is a section
    for csv_file in [table] * table.is_file() + companions:
        parts.append(f"[Download {csv_file.name}](results/{csv_file.name})")
        used.add(csv_file.name)
    return "\n\n".join(parts), used


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "results.md":
        return markdown
    results = _results_dir(config)
    used: set[str] = set()

    def replace(match: re.Match) -> str:
        texts = []
        for name in match.group(1).split():
            text, files_used = _section(results, name)
            used.update(files_used)
            if text:
                texts.append(text)
        if texts:
            return "\n\n".join(texts)
        names = ", ".join(f"`benchmarks/{n}.py`" for n in match.group(1).split())
        return f"*Not measured yet* ({names} writes it into `docs/results/`)."

    markdown = MARKER.sub(replace, markdown)
    others = sorted(p.name for p in results.glob("*")
                    if p.suffix in OUTPUT_SUFFIXES and p.name not in used) if results.is_dir() else []
    if others:
        markdown += "\n\n## Other results\n\nWritten by the benchmarks, not yet described above.\n\n"
        markdown += "\n".join(f"- [{name}](results/{name})" for name in others) + "\n"
    return markdown
