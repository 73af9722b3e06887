"""The report of a comparison sweep: a Markdown table, PNG plots and the numbers as JSON.

    python -m recipes.report reports/bert_finetune     # (re)write the report of a sweep folder
    python -m recipes.report SHARED_FOLDER --storage postgresql://user@host/db

Reads the sweep's Optuna study (its settings and trials; by default ``study.db`` in the folder,
or ``--storage URL`` and ``--study NAME`` as given to :mod:`recipes.compare`) and what each run
recorded in ``runs/<key>/result.json``, and writes

- ``report.html``: the same report as a page for any browser, plots embedded, with a link to
  each run's own page (:mod:`recipes.pages.sweep_page`), search runs included;
- ``report.md``: which optimizer won and how, one row per optimizer (mean ± sample standard
  deviation over seeds), one row per run, the LR search if there was one, the plots
  (:mod:`recipes.sweep.markdown`);
- ``results.json``: the same numbers, unrounded (:mod:`recipes.sweep.summary`);
- ``curves.png``, ``runs.png``, ``lr_schedule.png``, ``moments.png`` and ``lr_search.png``
  (:mod:`recipes.sweep.plots`).

Every file is written through a temporary name, so a reader never sees half of one.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from recipes.pages.run_page import PAGE_FILE
from recipes.pages.sweep_page import write_sweep_page
from recipes.sweep.commands import command_errors
from recipes.sweep.files import write_json, write_text
from recipes.sweep.markdown import markdown_report, optimizer_table, verdict
from recipes.sweep.plots import draw_figures
from recipes.sweep.storage import (
    STUDY_FILE,
    StorageError,
    dashboard_command,
    masked_url,
    open_storage,
    storage_url,
)
from recipes.sweep.summary import load_runs, summarize_optimizers, summarize_run, sweep_target

__all__ = ["main", "main_trials", "write_report"]


def main_trials(settings: Mapping[str, Any], current: Mapping[str, Any]) -> list[Any]:
    """The runs that compare optimizers: for a searched optimizer its search run at the chosen
    LR (first seed), then its further seeds; else its runs at the preset."""
    from recipes.sweep.study import chosen_lr

    first_seed = settings["seeds"][0]
    main = []
    for name in settings["optimizers"]:
        if name in settings["search"]:
            best = chosen_lr(current, name)
            main += [
                t
                for t in current.values()
                if t.optimizer == name
                and t.role == "lr-search"
                and t.lr == best
                and t.seed == first_seed
            ]
        main += [t for t in current.values() if t.optimizer == name and t.role == "compare"]
    return main


def _lr_sources(settings: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, str]:
    sources = {}
    for name in settings["optimizers"]:
        search = settings["search"].get(name)
        if search is None:
            sources[name] = settings["presets"][name]["source"]
        else:
            sources[name] = f"best of {len(search['lrs'])} by validation accuracy"
    return sources


def _summaries(loaded: Sequence[tuple], target: float) -> list[Any]:
    """One :class:`~recipes.sweep.summary.RunSummary` per loaded run, a failure's reason kept."""
    summaries = []
    for run, result, failure in loaded:
        summary = summarize_run(run, result, target)
        if failure is not None and result is None:
            summary.error = failure.get("error", "")
        summaries.append(summary)
    return summaries


def _run_folders(folder: Path, keys: Sequence[str]) -> dict[str, str | None]:
    """Each run's folder holding its ``run.html`` (the newest attempt's), found under
    ``runs/<key>/`` so that a folder shared between machines links on every one of them."""
    found: dict[str, str | None] = {}
    for key in keys:
        pages = sorted(
            (folder / "runs" / key).glob(f"**/{PAGE_FILE}"), key=lambda p: p.stat().st_mtime
        )
        found[key] = str(pages[-1].parent) if pages else None
    return found


def _storage_line(url: str, folder: Path, study: str) -> str:
    local = f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    if url == local:
        return (
            f"Optuna study `{study}` in `{STUDY_FILE}` (SQLite, this folder); look at it with "
            f"`optuna-dashboard sqlite:///{STUDY_FILE}` run in this folder."
        )
    return (
        f"Optuna study `{study}` in `{masked_url(url)}`; look at it with "
        f"`{dashboard_command(url)}`."
    )


def write_report(
    folder: str | Path,
    *,
    storage: str | None = None,
    study: str | None = None,
    print_table: bool = True,
) -> str:
    """Write ``report.md``, ``report.html``, ``results.json`` and the PNGs into ``folder``; the
    report's text. ``storage`` and ``study`` default as in :mod:`recipes.compare`."""
    from recipes.sweep.study import chosen_lr, load_sweep

    folder = Path(folder)
    url = storage_url(storage, folder)
    if storage is None and not (folder / STUDY_FILE).is_file():
        raise ValueError(
            f"folder: got {str(folder)!r}, which has no {STUDY_FILE}; allowed: a folder written "
            "by recipes.compare (or --storage URL for a sweep in another database)"
        )
    name = study or folder.resolve().name
    _, settings, current = load_sweep(open_storage(url), name)
    sources = _lr_sources(settings, current)
    main = main_trials(settings, current)
    main_keys = {t.key for t in main}
    search = [t for t in current.values() if t.role == "lr-search"]
    loaded = load_runs(folder, main, sources)
    search_loaded = load_runs(folder, search)
    finished = [result for _, result, _ in loaded if result is not None]
    target, target_note = sweep_target(
        finished + [r for _, r, _ in search_loaded if r is not None],
        settings.get("target_accuracy"),
    )
    runs, search_runs = _summaries(loaded, target), _summaries(search_loaded, target)
    chosen = {n: chosen_lr(current, n) for n in settings["search"]}
    summaries = summarize_optimizers(runs)

    results_by_optimizer: dict[str, list[dict]] = {}
    for run, result, _ in loaded:
        if result is not None:
            results_by_optimizer.setdefault(run["optimizer"], []).append(result)
    best_first = {
        s.optimizer: results_by_optimizer[s.optimizer]
        for s in summaries
        if s.optimizer in results_by_optimizer
    }
    each_run = {
        run["key"]: (run["optimizer"], result)
        for run, result, _ in loaded
        if result is not None and run["optimizer"] in best_first
    }
    figures = draw_figures(best_first, folder, each_run, search_runs, chosen)
    machines = sorted({result.get("machine", "") for result in finished} - {""})
    sweep = {**settings, "search": settings["search"]}
    text = markdown_report(
        sweep,
        summaries,
        runs,
        search_runs,
        target,
        target_note,
        figures,
        folder,
        machines,
        chosen=chosen,
        storage_line=_storage_line(url, folder, name),
    )
    write_text(folder / "report.md", text)
    keys = [*(t.key for t in main), *(t.key for t in search if t.key not in main_keys)]
    page = write_sweep_page(folder, text, _run_folders(folder, keys))
    write_json(
        folder / "results.json",
        {
            "recipe": settings["recipe"],
            "target_accuracy": target,
            "optimizers": [asdict(s) for s in summaries],
            "runs": [asdict(r) for r in runs],
            "lr_search_runs": [asdict(r) for r in search_runs],
            "chosen_lrs": {
                k: (v if v is None or math.isfinite(v) else None) for k, v in chosen.items()
            },
        },
    )
    if print_table:
        memory_kind = next((r.memory_kind for r in runs if r.memory_kind), "RSS")
        print(verdict(summaries, target))
        print(optimizer_table(summaries, target, memory_kind))
        print(f"Report: {folder / 'report.md'}")
        print(f"Report page: {page.resolve().as_uri()}")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m recipes.report", exit_on_error=False)
    parser.add_argument("folder")
    parser.add_argument("--storage", default=None)
    parser.add_argument("--study", default=None)
    try:
        options = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit):
        print(
            "usage: python -m recipes.report SWEEP_FOLDER [--storage URL] [--study NAME]",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    with command_errors("python -m recipes.report", failures=(StorageError,)):
        write_report(options.folder, storage=options.storage, study=options.study)


if __name__ == "__main__":
    main()
