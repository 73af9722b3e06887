"""``python -m recipes.claims``: run the pre-registered claims study, render its report, rerun a run.

    python -m recipes.claims                       # run (or resume) every arm, then the report
    python -m recipes.claims --claims fp16_eps     # only the arms these claims compare
    python -m recipes.claims --render-only         # the report again, from the stored study
    python -m recipes.claims --rerun resnet_adam_cosine/adam-seed43   # one run again, compared
    python -m recipes.claims --quick --out reports/claims-quick       # the pipeline, tiny budget

The experiments are those of ``configs/claims.yaml`` (``--registry``), each arm a sweep of the
comparison engine (:mod:`recipes.claims.arms`), stored under ``<out>/study``
(:mod:`recipes.claims.store`); the report is ``<out>/claims.md`` and ``<out>/claims.html``
(:mod:`recipes.claims.report`). Running the same command again resumes the study.
``--quick`` runs every selected experiment at a tiny budget (2 seeds, 2 LR trials): its
numbers are no evidence, and its report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from recipes.claims.registry import DEFAULT_REGISTRY, Claim, Registry, load_registry
from recipes.claims.store import StudyPaths, ensure_live, sync
from recipes.sweep.commands import command_errors
from recipes.sweep.storage import StorageError

__all__ = ["PROG", "main", "selected_claims"]

PROG = "python -m recipes.claims"
DEFAULT_OUT = Path("docs") / "claims"
DEFAULT_WORK = Path("reports") / "claims-work"  # for DEFAULT_OUT: outside the docs site
QUICK_OUT = Path("reports") / "claims-quick"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--registry", default=None, help="the experiments file (default configs/claims.yaml)")
    add("--out", default=None, help=f"report and study folder (default {DEFAULT_OUT})")
    add("--claims", default=None, help="comma-separated claim ids (default: all)")
    add("--quick", action="store_true", help="tiny budget: the pipeline end to end, no evidence")
    add(
        "--task-args",
        action="append",
        default=[],
        metavar="TASK=OPTIONS",
        help="more recipe options for every run of a task, e.g. bert='--data.max_length 32'",
    )
    add(
        "--work",
        default=None,
        help=f"live study and run folders, never committed (default {DEFAULT_WORK} for "
        f"{DEFAULT_OUT}, else OUT/study/work)",
    )
    add("--threads", type=int, default=1, help="torch threads per run (default 1)")
    add("--render-only", action="store_true", help="write the report from the stored study")
    add("--rerun", default=None, metavar="ARM/KEY", help="run one stored run again and compare")
    add(
        "--live-report",
        action="store_true",
        help="after each arm, store and render in a fresh process (picks up newer report code)",
    )
    add("--sync-only", action="store_true", help=argparse.SUPPRESS)
    return parser


def selected_claims(registry: Registry, text: str | None) -> list[Claim]:
    if text is None:
        return list(registry.claims)
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise ValueError(f"claims: got {text!r}; allowed: comma-separated claim ids")
    return [registry.claim(claim_id) for claim_id in ids]


def _task_args(items: Sequence[str], registry: Registry) -> dict[str, list[str]]:
    from recipes.claims.registry import _unknown

    parsed: dict[str, list[str]] = {}
    for item in items:
        task, sep, options = item.partition("=")
        if not sep:
            raise ValueError(f"task-args: got {item!r}; allowed: TASK=OPTIONS such as bert='...'")
        if task not in registry.tasks:
            raise ValueError(_unknown("task-args", task, list(registry.tasks)))
        parsed.setdefault(task, []).extend(shlex.split(options))
    return parsed


def _out(options: argparse.Namespace) -> Path:
    if options.out is not None:
        return Path(options.out)
    return QUICK_OUT if options.quick else DEFAULT_OUT


def _paths(options: argparse.Namespace) -> StudyPaths:
    out = _out(options)
    if options.work is not None:
        work = Path(options.work)
    elif out.resolve() == DEFAULT_OUT.resolve():
        work = DEFAULT_WORK
    else:
        work = None
    return StudyPaths(out / "study", work)


def _write_manifest(paths: StudyPaths, options: argparse.Namespace, registry_path: Path) -> None:
    """What the study is (full or quick): the report reads it."""
    manifest = paths.root / "study.json"
    data = {"quick": bool(options.quick)}
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old.get("quick") != data["quick"]:
            raise ValueError(
                f"quick: the study in {paths.root} was run {'with' if old['quick'] else 'without'}"
                " --quick; allowed: the same, or another --out"
            )
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _render(out: Path, registry: Registry, registry_path: Path) -> Path:
    """Write the report; for the committed study (``docs/claims``, run from the repository's
    root) also the README's headline table, so the two never differ."""
    from recipes.claims.report import readme_with_headline, write_report

    report = write_report(out, registry, registry_path)
    readme = Path("README.md")
    if out.resolve() == DEFAULT_OUT.resolve() and readme.is_file():
        headline = (out / "headline.md").read_text()
        readme.write_text(readme_with_headline(readme.read_text(), headline))
    return report


def _sync_and_render_in_child(argv: Sequence[str]) -> None:
    """Store and render in a fresh process (``--live-report``): newer code is picked up."""
    command = [sys.executable, "-m", "recipes.claims", "--sync-only", *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        print(f"{PROG}: report not written: {' | '.join(tail)}", flush=True)
    else:
        print(done.stdout.strip(), flush=True)


def _forwarded(options: argparse.Namespace) -> list[str]:
    argv = ["--out", str(_out(options))]
    if options.work:
        argv += ["--work", options.work]
    if options.registry:
        argv += ["--registry", options.registry]
    if options.quick:
        argv.append("--quick")
    return argv


def run_study(options: argparse.Namespace, registry: Registry, registry_path: Path) -> Path:
    from recipes.claims.arms import run_arm, sweep_argv

    out = _out(options)
    paths = _paths(options)
    claims = selected_claims(registry, options.claims)
    task_args = _task_args(options.task_args, registry)
    _write_manifest(paths, options, registry_path)
    ensure_live(paths)
    storage = StudyPaths.url(paths.live_db)
    arms = registry.arms_of(claims)
    all_arms = list(registry.arms)
    started = time.perf_counter()
    failed: list[str] = []
    for index, arm in enumerate(arms, 1):
        print(f"[{index}/{len(arms)}] arm {arm.name}: {arm.title}", flush=True)
        argv = sweep_argv(
            registry,
            arm,
            work=paths.work,
            storage=storage,
            quick=options.quick,
            task_args=task_args,
            threads=options.threads,
        )
        try:
            run_arm(argv)
        except (ValueError, StorageError) as error:
            # One arm's usage error (every run of it would repeat it) or storage failure: said,
            # and the other arms go on; its claims stay "not yet run".
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            print(f"{PROG}: arm {arm.name} stopped: {first}", flush=True)
            failed.append(arm.name)
        if options.live_report:
            _sync_and_render_in_child(_forwarded(options))
        else:
            sync(paths, all_arms)
    count = sync(paths, all_arms)
    report = _render(out, registry, registry_path)
    print(
        f"{count} runs stored in {paths.root}; {len(arms)} arms in "
        f"{time.perf_counter() - started:.0f} s; report: {report}",
        flush=True,
    )
    if failed:
        raise ValueError(f"arms: {', '.join(failed)} stopped early (see above); the others ran")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    options = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    registry_path = Path(options.registry) if options.registry else DEFAULT_REGISTRY
    with command_errors(PROG, resumable=True):
        if options.threads < 1:
            raise ValueError(f"threads: got {options.threads}; allowed: an integer >= 1")
        registry = load_registry(registry_path)
        selected_claims(registry, options.claims)  # an unknown id is refused in every mode
        out = _out(options)
        if options.rerun is not None:
            from recipes.claims.rerun import rerun

            raise SystemExit(rerun(out, options.rerun, threads=options.threads))
        if options.sync_only:
            count = sync(_paths(options), list(registry.arms))
            report = _render(out, registry, registry_path)
            print(f"{count} runs stored; report: {report}")
            return
        if options.render_only:
            print(f"report: {_render(out, registry, registry_path)}")
            return
        os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
        run_study(options, registry, registry_path)
