"""The sweep folder's files are written whole or not at all: through a temporary name, then an
atomic rename, so a reader (a resumed sweep, the report) never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json", "write_text"]


def read_json(path: Path) -> Any:
    """The JSON content of ``path``; ``None`` if there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def write_json(path: Path, content: Any) -> None:
    """Write ``content`` as JSON to ``path``, atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(content, indent=1))
