"""The page of a comparison sweep: ``report.html`` beside ``report.md``, with the same text and
tables, the plots embedded, and a link to each run's own page.

The Markdown report is turned into HTML by Python-Markdown (its ``tables`` extension, raw HTML
shown as text), so the two never disagree; pictures the report names are embedded as data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import markdown

from recipes.pages.html import image, link, page, table
from recipes.pages.run_page import PAGE_FILE
from recipes.sweep.files import write_text

__all__ = ["SWEEP_PAGE_FILE", "write_sweep_page"]

SWEEP_PAGE_FILE = "report.html"
_IMAGE = re.compile(r'<p><img alt="([^"]*)" src="([^"]+\.png)" ?/?></p>')


def write_sweep_page(
    folder: str | Path, report: str, run_folders: Mapping[str, str | None] | None = None
) -> Path:
    """Write ``<folder>/report.html`` from the Markdown ``report``; ``run_folders`` maps run
    keys to their run folders, whose pages the page links to."""
    folder = Path(folder)
    converter = markdown.Markdown(extensions=["tables"], output_format="html")
    # The report quotes run errors and names; any HTML in them is shown as text, not parsed.
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(report)

    def embed(match: re.Match[str]) -> str:
        path = folder / match.group(2)
        return image(path, match.group(1)) if path.is_file() else match.group(0)

    body = _IMAGE.sub(embed, body)
    links = _run_links(folder, run_folders or {})
    if links:
        body += f"\n<h2>Each run's page</h2>\n{links}"
    title = re.search(r"^# (.+)$", report, flags=re.MULTILINE)
    path = folder / SWEEP_PAGE_FILE
    write_text(path, page(title.group(1) if title else "Optimizer comparison", body))
    return path


def _run_links(folder: Path, run_folders: Mapping[str, str | None]) -> str:
    rows: list[Sequence[object]] = []
    for key, run_folder in run_folders.items():
        if run_folder and (Path(run_folder) / PAGE_FILE).is_file():
            target = os.path.relpath(Path(run_folder) / PAGE_FILE, folder)
            rows.append((key, link(target, target)))
    return table(("run", "page"), rows) if rows else ""
