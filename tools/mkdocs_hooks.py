"""MkDocs hooks for the documentation site (``mkdocs.yml``: ``hooks``).

``on_config``: every top-level page of ``docs/`` that the configured ``nav`` does not name is
added under "More", titled by its first ``# `` heading, so a page written beside the others is
part of the site (and of ``mkdocs build --strict``'s link checks) without editing ``nav``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _named(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_named(value) for value in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_named(item) for item in nav))
    return set()


def _title(page: Path) -> str:
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return page.stem.replace("_", " ").capitalize()


def on_config(config: Any) -> Any:
    nav = config.get("nav")
    if not nav:
        return config
    docs = Path(config["docs_dir"])
    named = _named(nav)
    extra = [
        {_title(page): page.name} for page in sorted(docs.glob("*.md")) if page.name not in named
    ]
    if extra:
        nav.append({"More": extra})
    return config
