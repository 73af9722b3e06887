"""What every test shares: an offline, quiet, one-thread environment and the expensive helpers.

A skipped test fails, except for a Debian package the machine cannot install (see
``pytest_runtest_makereport``). Fixtures:

- every test runs in its own temporary folder (W&B runs and Lightning logs land there), with
  torch on one thread and a plain ``sys.argv`` (autouse);
- ``wandb_run``: reads an offline W&B run back from disk (``wandb leet inspect``);
- ``two_processes``: runs a script of ``tests/scripts`` as two gloo processes and returns what
  each rank wrote;
- ``tiny_bert`` / ``keyword_csv``: a random 2-layer BERT checkpoint folder and a small labelled
  CSV, built once per pytest run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import system_packages

# W&B never reaches the network from tests, and never asks for a login.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "tests" / "scripts"
LAUNCHER_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
# Set by W&B in this process once an in-process test started a run: it points children at this
# process's W&B service, which a later test may have torn down. A child starts its own.
INHERITED_KEYS = (*LAUNCHER_KEYS, "WANDB_SERVICE")


# The files whose tests take a minute or more (sweeps, killed and resumed runs, two-process
# jobs, the claims study), longest first as measured (seconds of test time in one full run:
# 404, 228, 106, 99, 84, 70, 62, 57): under ``make test``'s two workers (``-n 2 --dist
# loadfile``) a long file then never starts last and leaves the other worker idle at the end.
LONGEST_FIRST = (
    "tests/recipes/test_compare.py",
    "tests/recipes/test_bert_finetune.py",
    "tests/recipes/test_cli.py",
    "tests/lib/test_moment_stats.py",
    "tests/recipes/test_vision_recipes.py",
    "tests/conformance/test_matrix.py",
    "tests/recipes/test_claims.py",
    "tests/lib/test_sharded.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.relative_to(REPO_ROOT).as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file, and of the others, is kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A skipped test is a failed one here: the suite runs every test it holds (``make test``
    installs what they need), so a skip (ours or a library's ``importorskip``) says why and
    fails. The one exception: a Debian package that this machine cannot install (no root or
    no apt; see ``tests/system_packages.py``)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        if str(reason).startswith(f"Skipped: {system_packages.SKIP_PREFIX}"):
            return  # a Debian package this machine cannot install (tests/system_packages.py)
        report.outcome = "failed"
        report.longrepr = f"skipped, which this suite does not allow: {reason}"


@pytest.fixture(autouse=True)
def _isolated_run_dirs(tmp_path, monkeypatch):
    """Each test writes W&B runs and Lightning logs under its own temporary folder."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(autouse=True)
def _one_thread_plain_argv(monkeypatch):
    """Tiny models run as fast on one thread, and a second one only thrashes when the CPU is
    shared; the recipes' parsers read the test's arguments, never pytest's."""
    monkeypatch.setattr(sys, "argv", ["recipe"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WandbRunReader:
    """Reads the one offline W&B run under a folder (``<folder>/wandb/offline-run-*``), or a
    run folder or ``.wandb`` file itself, through ``wandb leet inspect``."""

    @staticmethod
    def run_file(path: Path) -> Path:
        path = Path(path)
        if path.suffix == ".wandb":
            return path
        found = sorted(path.glob("run-*.wandb")) or sorted(
            path.glob("**/offline-run-*/run-*.wandb")
        )
        assert len(found) == 1, f"expected one offline W&B run under {path}, found {found}"
        return found[0]

    def _inspect(self, path: Path, *flags: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return done.stdout

    def records(self, path: Path) -> list[dict[str, Any]]:
        """Every record of the run (history rows, summary, config, ...)."""
        out = self._inspect(self.run_file(path))
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def history(self, path: Path) -> list[dict[str, Any]]:
        """The run's history rows, in logging order."""
        return [r["history"]["item"] for r in self.records(path) if r.get("type") == "history"]

    @staticmethod
    def metric_keys(rows: list[dict[str, Any]]) -> set[str]:
        """The metrics of history rows: a histogram or image (logged as ``<key>._type``,
        ``<key>.width``, ...) counts once as ``<key>``; W&B's own ``_step`` and the like and
        ``trainer/global_step`` are left out."""
        keys = {k for row in rows for k in row}
        media = {k.removesuffix("._type") for k in keys if k.endswith("._type")}
        return {
            k
            for k in keys
            if not k.startswith("_")
            and k != "trainer/global_step"
            and not any(k.startswith(f"{m}.") for m in media)
        } | media

    def summary_record(self, path: Path) -> dict[str, Any]:
        """The run's summary record: ``summary``, ``config``, ``state``, ``project``, ..."""
        return json.loads(self._inspect(self.run_file(path), "--summary"))

    def summary(self, path: Path) -> dict[str, Any]:
        """The run's summary."""
        return self.summary_record(path)["summary"]


@pytest.fixture(scope="session")
def wandb_run() -> WandbRunReader:
    return WandbRunReader()


def subprocess_env(**overrides: str) -> dict[str, str]:
    """This environment for a child process: the repository importable, no launcher variables
    or W&B service token left over, one OpenMP thread."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_KEYS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(overrides)
    return env


@pytest.fixture(scope="session")
def two_processes():
    """``launch(script, out_dir, *args, timeout=300)``: runs ``tests/scripts/<script>`` (which
    starts two gloo ranks itself, through a Trainer with ``devices=2``), asserts it succeeded
    and returns the JSON each rank wrote to ``out_dir/rank<r>.json``; what it printed is in
    ``out_dir/stdout.log``."""

    def launch(
        script: str, out_dir: Path, *args: str, timeout: int = 300, **env: str
    ) -> list[dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / script), str(out_dir), *args],
            env=subprocess_env(**env),
            cwd=out_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        (Path(out_dir) / "stdout.log").write_text(done.stdout)
        assert done.returncode == 0, done.stderr[-4000:]
        return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in (0, 1)]

    return launch


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer ``BertForSequenceClassification`` with the MiniLM
    tokenizer, saved like a hub checkpoint (built once per pytest run)."""
    from tests.recipes.tiny_text import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "bert")


@pytest.fixture(scope="session")
def keyword_csv(tmp_path_factory) -> Path:
    """A labelled CSV of three keyword classes a tiny BERT learns in seconds."""
    from tests.recipes.tiny_text import keyword_rows, write_csv

    return write_csv(tmp_path_factory.mktemp("keywords") / "keywords.csv", keyword_rows())


@pytest.fixture(scope="session")
def tiny(tiny_bert, keyword_csv) -> tuple[Path, Path]:
    """``(tiny_bert, keyword_csv)``: the quick text task most recipe tests train on."""
    return tiny_bert, keyword_csv


@pytest.fixture(scope="session")
def killed_run():
    """``kill(module, args, cwd, after_step, signal_number=SIGKILL)``: runs
    ``python -m <module> ARGS`` in a child process that ``tests/scripts/kill.py`` ends with
    the signal after optimizer step ``after_step``; asserts it ended so and returns what it
    printed on stderr."""

    def kill(
        module: str, args: list[str], cwd: Path, after_step: int, signal_number: int = 9
    ) -> str:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                module,
                *args,
                "--trainer.callbacks+=tests.scripts.kill.KillAfterStep",
            ],
            env=subprocess_env(KILL_AFTER_STEP=str(after_step), KILL_SIGNAL=str(signal_number)),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
            # A shell starts background jobs with SIGINT ignored, and Python then leaves it so:
            # the child gets Ctrl-C's default, as a run in a terminal does.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        expected = -signal_number if signal_number == 9 else done.returncode
        assert done.returncode == expected and done.returncode != 0, done.stderr[-3000:]
        return done.stderr

    return kill
