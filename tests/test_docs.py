"""The documentation site: ``mkdocs build --strict`` passes (no broken link, no missing page or
reference, every docstring of the API reference parsed without a warning), and every public
name of ``optim_callbacks`` has its entry in the API reference."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optim_callbacks

REPO_ROOT = Path(__file__).resolve().parents[1]
API = REPO_ROOT / "docs" / "api"


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "api" / "callbacks" / "index.html").read_text()
    assert "GradientClipping" in reference and "max_norm" in reference  # rendered docstrings
    assert (tmp_path / "getting-started" / "index.html").is_file()


def test_every_public_name_is_in_the_api_reference():
    directives = set(re.findall(r"^::: ([\w.]+)$", _api_text(), re.MULTILINE))
    missing = []
    for name in optim_callbacks.__all__:
        obj = getattr(optim_callbacks, name)
        module = getattr(obj, "__module__", None) if hasattr(obj, "__qualname__") else None
        if module is None:  # an instance (OPTIMIZERS, SCHEDULES, ...): its name on a page
            if name not in _api_text():
                missing.append(name)
        elif module not in directives and f"{module}.{obj.__qualname__}" not in directives:
            missing.append(f"{name} ({module})")
    assert missing == [], f"add to a page of docs/api/: {missing}"


def _api_text() -> str:
    return "\n".join(page.read_text() for page in sorted(API.glob("*.md")))


def test_the_registry_table_names_every_entry_once():
    from optim_callbacks import OPTIMIZERS

    page = (REPO_ROOT / "docs" / "optimizers.md").read_text()
    table = page.split("| name | torch class |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)
    assert sorted(rows) == sorted(OPTIMIZERS.names())


def test_the_readme_leads_its_comparison_section_with_the_stored_claims_table():
    """The README's claims table is the one ``--render-only`` wrote into docs/claims (the
    README's copy is written by the same command)."""
    import pytest

    from recipes.claims.report import README_START, readme_with_headline

    readme = (REPO_ROOT / "README.md").read_text()
    headline = (REPO_ROOT / "docs" / "claims" / "headline.md").read_text()
    assert headline.startswith("| claim | task | verdict |")
    assert readme_with_headline(readme, headline) == readme
    section = readme.split("## Sweeps and the survey's claims", 1)[1]
    assert section.index(README_START) < section.index("python -m recipes.compare --recipe")
    with pytest.raises(ValueError, match=r"readme: no .* block"):
        readme_with_headline("# a README without the block\n", headline)
