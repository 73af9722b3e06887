"""Every command the README and the getting-started page show is runnable as written: each
``make`` names a Makefile target (and variables it defines), each ``python -m`` names a module
that exists, and the options given to a recipe, the sweep or ``optim_callbacks`` are accepted by
their parsers (the recipes' full parse and checks, without seeding, data or a model). Nothing
trains."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from tests.recipes.test_compare import DOC_COMMANDS as SWEEP_PAGE_COMMANDS

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/getting-started.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`((?:\.venv/bin/)?python -m [^`]+|make [^`]+)`")


def commands(page: str) -> list[str]:
    """``make ...`` and ``python -m ...`` commands of ``page``: lines of bash blocks (comments
    and line continuations resolved) and inline code."""
    text = (REPO_ROOT / page).read_text()
    found = []
    for language, block in FENCE.findall(text):
        if language not in ("bash", "sh", ""):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if re.match(r"(\.venv/bin/)?python -m |make ", line):
                found.append(line)
    found += INLINE.findall(text)
    # Prose that names a family ("python -m recipes.*", "python -m ...") is not a command.
    return sorted({c for c in found if c.strip() != "make" and "*" not in c and "..." not in c})


def makefile_targets_and_variables() -> tuple[set[str], set[str]]:
    makefile = (REPO_ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.MULTILINE))
    variables = set(re.findall(r"^(\w+)\s*\?=", makefile, re.MULTILINE))
    return targets, variables


# Other projects' command-line tools the pages run: that they are installed is the check.
TOOLS = ("mkdocs",)
ALL = [(page, command) for page in PAGES for command in commands(page)]


def test_the_pages_show_the_commands_a_newcomer_needs():
    readme = {command for page, command in ALL if page == "README.md"}
    assert {"make run", "make test"} <= readme
    assert any(c.startswith(".venv/bin/python -m ") for c in readme)  # inside the venv
    assert sum(c.startswith("python -m recipes.") for c in readme) >= 8


@pytest.mark.parametrize(("page", "command"), ALL, ids=[f"{p}: {c}" for p, c in ALL])
def test_command_is_runnable_as_written(page, command, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # commands are written for the repository's root
    words = shlex.split(command)
    if words[0] == "make":
        targets, variables = makefile_targets_and_variables()
        for word in words[1:]:
            if "=" in word:
                assert word.split("=", 1)[0] in variables, f"{command}: no such variable"
            else:
                assert word in targets, f"{command}: no target {word!r} in the Makefile"
        return
    module, args = words[2], words[3:]
    assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
    if command in SWEEP_PAGE_COMMANDS:
        return  # run for real, on a tiny model, by tests/recipes/test_compare.py
    if "--help" in args or not args or module in TOOLS:
        return
    if module in ("recipes.bert_finetune", "recipes.vit_finetune", "recipes.resnet_finetune"):
        recipe = importlib.import_module(module).RECIPE
        if "--print_config" in args:  # prints the configuration and exits 0
            with pytest.raises(SystemExit) as exit_info:
                recipe.configuration(args)
            assert exit_info.value.code == 0
            assert "optimizer: adamw" in capsys.readouterr().out
            return
        config = recipe.configuration(args)  # a usage error raises, naming the flag
        assert config is not None
    elif module == "recipes.compare":
        _check_sweep(args)
    elif module == "recipes.claims":  # its options only: running it is tests/recipes/test_claims
        from recipes.claims.cli import _parser

        _parser().parse_args(args)
    elif module == "optim_callbacks":
        from optim_callbacks.__main__ import main

        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(args) in (0, None)
        assert "adamw" in out.getvalue()
    else:
        pytest.fail(f"{command}: no check for module {module}; add one here")


def _check_sweep(args: list[str]) -> None:
    """The sweep's own options through its planner; the options it hands to every run (the
    dotted ones, ``--trainer.max_epochs 1``) through the recipe's parser."""
    from recipes.sweep.plan import plan_sweep

    plan_sweep(args)
    recipe_name = args[args.index("--recipe") + 1]
    recipe_args: list[str] = []
    for index, token in enumerate(args):
        if token.startswith("--") and "." in token.split("=", 1)[0]:
            recipe_args.append(token)
            if "=" not in token and index + 1 < len(args):
                recipe_args.append(args[index + 1])
    if recipe_args:
        recipe = importlib.import_module(f"recipes.{recipe_name}").RECIPE
        assert recipe.configuration(recipe_args) is not None
