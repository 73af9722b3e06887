"""The page of one recipe run: ``run.html`` in its run folder, beside ``checkpoints/``.

It shows the run's configuration, the headline curves, the layers x steps heatmaps, the switch
and clipping events, the test table and where the checkpoints and the W&B (or TensorBoard, CSV)
run are. It is drawn from the run folder alone (``run_record.json``, ``config.yaml``,
``heatmaps/``), so ``python -m recipes.run_page RUN_FOLDER`` draws it again.
"""

from __future__ import annotations

import itertools
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optim_callbacks.heatmaps import heatmap_statistics, matplotlib_available, render_heatmaps
from optim_callbacks.moment_history import MomentHistory
from recipes.pages.html import escape, image, page, table
from recipes.pages.run_curves import plot_run_curves
from recipes.pages.run_record import read_run_record
from recipes.sweep.files import read_json, write_text

__all__ = ["PAGE_FILE", "regenerate_command", "write_run_page"]

PAGE_FILE = "run.html"
_TEST_NAMES = {"test_acc": "accuracy", "test_f1": "macro F1", "test_loss": "loss"}
_EVENT_NAMES = {
    "switch": "optimizer switch",
    "nonfinite": "skipped non-finite steps",
    "clipping": "heavy clipping",
    "spike": "skipped spike",
}


def regenerate_command(folder: str | Path) -> str:
    return f"python -m recipes.run_page {shlex.quote(str(folder))}"


def write_run_page(folder: str | Path, *, redraw_heatmaps: bool = False) -> Path:
    """Write ``<folder>/run.html`` from the run folder's files; its path.

    ``redraw_heatmaps`` draws the heatmap PNGs again from ``heatmaps/history.json`` first (for a
    folder whose pictures were deleted or drawn by an older version).
    """
    folder = Path(folder)
    record = read_run_record(folder)
    heatmap_folder = folder / record["heatmaps"] if record.get("heatmaps") else None
    if redraw_heatmaps and heatmap_folder is not None and matplotlib_available():
        history = read_json(heatmap_folder / "history.json")
        if history is not None:
            render_heatmaps(MomentHistory.from_json(history), heatmap_folder)
    sections = [
        _header(record, folder),
        _findings_section(record),
        _test_section(record),
        _curves_section(record),
        _events_section(record),
        _heatmaps_section(heatmap_folder),
        _locations_section(record, folder),
        _config_section(folder),
    ]
    settings = record.get("settings", {})
    title = f"{record['recipe']} · {settings.get('optimizer', '?')} · {folder.name}"
    path = folder / PAGE_FILE
    write_text(path, page(title, "\n".join(s for s in sections if s)))
    return path


def _header(record: Mapping[str, Any], folder: Path) -> str:
    settings = record.get("settings", {})
    title = f"{record['recipe']}: {settings.get('optimizer', '?')}"
    fit = record.get("fit_seconds")
    facts = [
        f"run {folder.name}",
        f"finished {record['finished']}",
        f"{record['global_step']} optimizer steps",
    ]
    if fit:
        facts.append(f"fit {fit / 60:.1f} min")
    command = f"python -m recipes.{record['recipe']} {shlex.join(record.get('args', []))}"
    rows = [(name, value) for name, value in settings.items() if value is not None]
    return (
        f'<h1>{escape(title)}</h1>\n<p class="subtitle">{escape(" · ".join(facts))}</p>\n'
        f"<pre>{escape(command)}</pre>\n{table(('setting', 'value'), rows)}"
    )


def _test_section(record: Mapping[str, Any]) -> str:
    test = record.get("test") or {}
    results = test.get("results") or {}
    if not results:
        return ""
    rows = [(_TEST_NAMES.get(k, k), float(v)) for k, v in results.items()]
    caption = f"{test.get('examples', '?')} examples, {test.get('source', '')}"
    return f"<h2>Test results</h2>\n<p>{escape(caption)}</p>\n{table(('metric', 'value'), rows)}"


def _locations_section(record: Mapping[str, Any], folder: Path) -> str:
    rows: list[tuple[str, str]] = [("run folder", str(folder)), ("configuration", "config.yaml")]
    checkpoints = record.get("checkpoints") or {}
    if checkpoints.get("best"):
        rows.append(("best checkpoint", checkpoints["best"]))
    if checkpoints.get("last"):
        rows.append(("last checkpoint", f"{checkpoints['last']} (resume with --ckpt_path)"))
    loggers = record.get("loggers") or {}
    wandb = loggers.get("wandb")
    if wandb:
        if wandb.get("offline"):
            rows += [
                ("W&B run (offline)", wandb["run_dir"]),
                ("view in the terminal", f"wandb leet {shlex.quote(wandb['run_dir'])}"),
                ("upload", f"wandb sync {shlex.quote(wandb['run_dir'])}"),
            ]
        else:
            rows += [("W&B run", wandb["url"]), ("local files", wandb["run_dir"])]
    if loggers.get("tensorboard"):
        log_dir = loggers["tensorboard"]["log_dir"]
        rows.append(("TensorBoard", f"tensorboard --logdir {shlex.quote(log_dir)}"))
    if loggers.get("csv"):
        rows.append(("CSV metrics", loggers["csv"]["metrics"]))
    rows.append(("this page, drawn again", regenerate_command(folder)))
    return f"<h2>Where the run lives</h2>\n{table(('what', 'where'), rows)}"


def _findings_section(record: Mapping[str, Any]) -> str:
    """What the health rules (:mod:`optim_callbacks.health`) said, one row per finding."""
    if "findings" not in record:
        return ""
    findings = record["findings"]
    if not findings:
        return "<h2>Findings</h2>\n<p>No health rule fired.</p>"
    rows = [(f["seen"], f["cause"], f["try"]) for f in findings]
    return f"<h2>Findings</h2>\n{table(('what is seen', 'likely cause', 'try'), rows)}"


def _events_section(record: Mapping[str, Any]) -> str:
    events = [*(record.get("events") or []), *(record.get("spike_events") or [])]
    if not events:
        text = "No optimizer switch, skipped step (non-finite or spike) or heavy clipping was recorded."
        return f"<h2>Events</h2>\n<p>{text}</p>"
    rows = [
        (steps, _EVENT_NAMES.get(kind, kind), what) for steps, kind, what in event_spans(events)
    ]
    return f"<h2>Events</h2>\n{table(('steps', 'event', 'what'), rows)}"


def event_spans(events: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """Events of one kind at consecutive logging steps as one span: ``("3-47", kind, what)``.

    Steps are consecutive when they lie the smallest gap between two events of that kind apart
    (the logging interval); a span's text is its first event's and, if it differs, its last's.
    """
    spans: list[tuple[int, str, str, str]] = []
    for kind in dict.fromkeys(e["kind"] for e in events):
        of_kind = sorted((e for e in events if e["kind"] == kind), key=lambda e: e["step"])
        gaps = [b["step"] - a["step"] for a, b in itertools.pairwise(of_kind)]
        interval = min(gaps, default=0)
        start = 0
        for end in range(len(of_kind)):
            last = end == len(of_kind) - 1
            if last or of_kind[end + 1]["step"] - of_kind[end]["step"] != interval:
                first, final = of_kind[start], of_kind[end]
                steps = str(first["step"])
                what = first["label"]
                if end > start:
                    steps += f"–{final['step']} ({end - start + 1} logging steps)"
                    if final["label"] != what:
                        what += f" … {final['label']}"
                spans.append((first["step"], kind, steps, what))
                start = end + 1
    return [(steps, kind, what) for _, kind, steps, what in sorted(spans)]


def _curves_section(record: Mapping[str, Any]) -> str:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "curves.png"
        if not plot_run_curves(record, path):
            return ""
        return f"<h2>Curves</h2>\n{image(path, 'headline curves')}"


def _heatmaps_section(heatmap_folder: Path | None) -> str:
    if heatmap_folder is None or not heatmap_folder.is_dir():
        return ""
    history = read_json(heatmap_folder / "history.json")
    order = heatmap_statistics(MomentHistory.from_json(history)) if history else []
    found = {p.stem: p for p in heatmap_folder.glob("*.png")}
    names = [n for n in order if n in found] + sorted(set(found) - set(order))
    if not names:
        return ""
    figures = "".join(image(found[n], f"heatmap of {n}", n) for n in names)
    intro = (
        "One row per layer (module order), one column per logged step; a log colour scale where "
        "the statistic spans decades. Dashed line: optimizer switch; ✕ above: skipped non-finite "
        "steps; ▼ above: clipping acted on at least the threshold share of steps."
    )
    return f'<h2>Layers × steps</h2>\n<p>{escape(intro)}</p>\n<div class="grid">{figures}</div>'


def _config_section(folder: Path) -> str:
    config = folder / "config.yaml"
    if not config.is_file():
        return ""
    return f"<h2>Configuration (config.yaml)</h2>\n<pre>{escape(config.read_text())}</pre>"
