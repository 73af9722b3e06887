"""The report of a comparison sweep: a Markdown table, PNG plots and the numbers as JSON.

    python -m recipes.report reports/bert_finetune     # (re)write the report of a sweep folder

Reads what :mod:`recipes.compare` left in the folder (``sweep.json``; per run ``run.json`` and
the recorder's ``result.json``, or ``failure.json``) and writes

- ``report.html``: the same report as a page for any browser, plots embedded, with a link to
  each run's own page (:mod:`recipes.pages.sweep_page`);
- ``report.md``: which optimizer won and how, one row per optimizer (mean ± sample standard
  deviation over seeds), one row per run, the LR search if there was one, the plots
  (:mod:`recipes.sweep.markdown`);
- ``results.json``: the same numbers, unrounded (:mod:`recipes.sweep.summary`);
- ``curves.png``, ``runs.png``, ``lr_schedule.png`` and ``moments.png``
  (:mod:`recipes.sweep.plots`).

Every file is written through a temporary name, so a reader never sees half of one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from recipes.pages.sweep_page import write_sweep_page
from recipes.sweep.files import read_json, write_json, write_text
from recipes.sweep.markdown import markdown_report, optimizer_table, verdict
from recipes.sweep.plots import draw_figures
from recipes.sweep.summary import load_runs, summarize_optimizers, summarize_run, sweep_target

__all__ = ["main", "write_report"]


def write_report(folder: str | Path, *, print_table: bool = True) -> str:
    """Write ``report.md``, ``report.html``, ``results.json`` and the PNGs into ``folder``; the
    report's text."""
    folder = Path(folder)
    sweep = read_json(folder / "sweep.json")
    if sweep is None:
        raise ValueError(
            f"folder: got {str(folder)!r}, which has no sweep.json; allowed: a folder written by recipes.compare"
        )
    loaded = load_runs(folder, sweep["main_runs"])
    search_keys = [key for entry in sweep.get("lr_search", {}).values() for key in entry["runs"]]
    search_loaded = load_runs(folder, search_keys)
    finished = [result for _, result, _ in loaded if result is not None]
    target, target_note = sweep_target(
        finished + [r for _, r, _ in search_loaded if r is not None], sweep.get("target_accuracy")
    )
    runs = []
    for run, result, failure in loaded:
        summary = summarize_run(run, result, target)
        chosen = sweep.get("lrs", {}).get(run["optimizer"])
        if chosen is not None and chosen["value"] == run["lr"]:
            summary.lr_source = chosen["source"]
        if failure is not None and result is None:
            summary.error = failure.get("error", "")
        runs.append(summary)
    search_runs = {
        run["key"]: summarize_run(run, result, target) for run, result, _ in search_loaded
    }
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
    figures = draw_figures(best_first, folder, each_run)
    machines = sorted({result.get("machine", "") for result in finished} - {""})
    text = markdown_report(
        sweep, summaries, runs, search_runs, target, target_note, figures, folder, machines
    )
    write_text(folder / "report.md", text)
    run_folders = {run["key"]: (result or {}).get("run_folder") for run, result, _ in loaded}
    page = write_sweep_page(folder, text, run_folders)
    write_json(
        folder / "results.json",
        {
            "recipe": sweep["recipe"],
            "target_accuracy": target,
            "optimizers": [asdict(s) for s in summaries],
            "runs": [asdict(r) for r in runs],
            "lr_search_runs": [asdict(r) for r in search_runs.values()],
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
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m recipes.report SWEEP_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    try:
        write_report(argv[0])
    except ValueError as error:
        print(f"python -m recipes.report: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
