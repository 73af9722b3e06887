"""The claims study's report: ``claims.md``, ``claims.html``, ``headline.md`` and SVG plots.

Everything on the pages comes from the stored study (``study/study.db`` and
``study/records``) and the registry, so ``python -m recipes.claims --render-only`` writes the
same bytes again: no clock is read, plots are SVG with a fixed hash salt and no date. Both pages
are rendered from one list of blocks (headings, paragraphs, tables, figures), so they say the
same thing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from recipes.claims.analysis import (
    NOT_YET_RUN,
    ArmResult,
    ClaimResult,
    ComparisonResult,
    evaluate,
    load_arms,
    verdict_counts,
)
from recipes.claims.registry import Claim, Registry
from recipes.claims.store import StudyPaths
from recipes.claims.verdict import UNTESTED, paired_seeds

__all__ = ["write_report"]

REGISTRY_SHOWN = "configs/claims.yaml"
UNITS = {
    "test_acc": ("test accuracy", 100.0, "pp"),
    "final_val_loss": ("final validation loss", 1.0, ""),
    "mean_val_loss": ("mean validation loss", 1.0, ""),
    "effective_lr_log10_ratio": ("log10 effective-LR ratio (end/start)", 1.0, ""),
}
# The recipe options that switch a run's optimizer during training (recipes.core.cli's
# callback options): an arm whose command turns one on means to change optimizer.
OPTIMIZER_SWITCHES = ("--adam_to_sgd",)
OFF = ("null", "none", "false")


@dataclass(frozen=True)
class Link:
    text: str
    href: str


Cell = str | Link
Block = tuple[str, Any]  # ("h1"|"h2"|"h3"|"p"|"quote"|"table"|"figure"|"code", payload)


def _fmt(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    _, scale, unit = UNITS[metric]
    if unit == "pp" and not signed:
        unit = "%"  # a value in percent; a difference in percentage points
    text = f"{value * scale:+.2f}" if signed else f"{value * scale:.2f}"
    if metric in ("final_val_loss", "mean_val_loss"):
        text = f"{value:+.4f}" if signed else f"{value:.4f}"
    return f"{text} {unit}".strip()


def _anchor(claim_id: str) -> str:
    return f"claim-{claim_id.replace('_', '-')}"


def _records_link(arm: str, key: str) -> str:
    return f"study/records/{arm}/{key}.json"


def _short(arm: str) -> str:
    """An arm's name without its task prefix (``resnet_adam_cosine`` -> ``adam_cosine``)."""
    return arm.split("_", 1)[1] if "_" in arm else arm


def _comparison_label(result: Any) -> str:
    c = result.comparison
    if c.other is None:
        return f"{_short(c.arm)} (vs 0)"
    return f"{_short(c.arm)} {c.relation} {_short(c.other)}"


def _effect_text(claim: Claim, result: Any) -> tuple[str, str]:
    if result.raw is None:
        return ("—", "—")
    if result.verdict == UNTESTED:  # a zero-width interval of identical runs is no measurement
        return ("0 (identical runs)", "none (identical runs)")
    effect, low, high = result.raw
    return (
        _fmt(claim.metric, effect, signed=True),
        f"[{_fmt(claim.metric, low, signed=True)}, {_fmt(claim.metric, high, signed=True)}]",
    )


def _verdict_text(result: ClaimResult) -> str:
    details = []
    if len(result.per_task) > 1 and result.verdict != NOT_YET_RUN:
        details += [f"{t}: {v}" for t, v in result.per_task.items()]
    if len(result.comparisons) > 1 and result.verdict != UNTESTED:
        details += [
            f"{_comparison_label(c)}: {UNTESTED}"
            for c in result.comparisons
            if c.verdict == UNTESTED
        ]
    return f"{result.verdict} ({', '.join(details)})" if details else result.verdict


def _switches_optimizer(args: Sequence[str]) -> bool:
    """Whether a recipe command line turns on an optimizer switch (:data:`OPTIMIZER_SWITCHES`):
    ``--adam_to_sgd CLASS`` or any ``--adam_to_sgd.OPTION`` does, ``--adam_to_sgd null`` (or
    false) turns it off; the last one wins, as in the recipe's parser."""
    on = False
    for i, arg in enumerate(args):
        name, has_value, value = arg.partition("=")
        if name in OPTIMIZER_SWITCHES:
            if not has_value:
                value = args[i + 1] if i + 1 < len(args) else ""
            on = value.lower() not in OFF
        elif name.startswith(tuple(f"{option}." for option in OPTIMIZER_SWITCHES)):
            on = True
    return on


def _optimizer_classes(arm: ArmResult, seeds: Sequence[int]) -> list[str] | None:
    """The optimizer classes the arm's runs at ``seeds`` used (their records'
    ``optimizer_classes``: the optimizers at the end of training); ``None`` when a record does
    not say."""
    found: dict[str, None] = {}
    for seed in seeds:
        classes = arm.runs[seed].get("optimizer_classes")
        if not classes:
            return None
        found.update(dict.fromkeys(classes))
    return list(found)


def _switch_words(arm: ArmResult, other: ArmResult, seeds: Sequence[int], both: bool) -> str:
    """What the records say about ``arm``, meant to switch optimizer, against ``other`` (also
    meant to when ``both``), the arm it ran identically to."""
    mine, theirs = _optimizer_classes(arm, seeds), _optimizer_classes(other, seeds)
    if mine is None:
        return (
            f"{arm.arm.name} is meant to switch optimizer, but its records do not say which "
            "optimizer classes its runs used"
        )
    used = " and ".join(mine)
    if mine == theirs and not both:  # the same optimizers as an arm that never switches
        return (
            f"{arm.arm.name} never switched optimizer: its runs used {used} only "
            "(`optimizer_classes` of their records)"
        )
    return f"{arm.arm.name}'s runs ended on {used} (`optimizer_classes` of their records)"


def _identical_text(
    registry: Registry, claim: Claim, result: ComparisonResult, arms: dict[str, ArmResult]
) -> str:
    """In words, why an untested comparison measured nothing: its two arms gave the same value
    at every seed, and (for an arm meant to switch optimizer) which optimizers its runs used."""
    assert result.comparison.other is not None  # identical runs are a paired comparison's
    first, second = arms[result.comparison.arm], arms[result.comparison.other]
    seeds = paired_seeds(first.values(claim.metric), second.values(claim.metric))
    meant = {
        a.arm.name: _switches_optimizer([*registry.tasks[a.arm.task].args, *a.arm.args])
        for a in (first, second)
    }
    switches = [
        (arm, other, _switch_words(arm, other, seeds, all(meant.values())))
        for arm, other in ((first, second), (second, first))
        if meant[arm.arm.name]
    ]
    if len(switches) == 1:
        _, other, words = switches[0]
        same = f"{words}, so it ran identically to {other.arm.name}"
    else:
        same = "".join(f"{words}; " for _, _, words in switches)
        same += f"{'so ' if switches else ''}{first.arm.name} ran identically to {second.arm.name}"
    return (
        f"**{_comparison_label(result)} is {UNTESTED}.** {same}: the same "
        f"{UNITS[claim.metric][0]} at every seed ({', '.join(map(str, seeds))}), every paired "
        "difference exactly 0. The comparison measured nothing: it is no evidence for or "
        "against the claim."
    )


def _seconds(records: Sequence[dict[str, Any]]) -> float:
    return sum(float(r.get("run_seconds") or 0.0) for r in records)


def _all_records(paths: StudyPaths) -> list[dict[str, Any]]:
    if not paths.records.exists():
        return []
    return [json.loads(p.read_text()) for p in sorted(paths.records.glob("*/*.json"))]


def _plot(claim_result: ClaimResult, arms: dict[str, ArmResult], target: Path) -> bool:
    """Per-seed values of each arm the claim compares (lines join the same seed); ``False``
    when no arm has a run yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claim = claim_result.claim
    names = list(
        dict.fromkeys(n for c in claim.comparisons for n in (c.arm, c.other) if n is not None)
    )
    values = {n: arms[n].values(claim.metric) for n in names}
    if not any(values.values()):
        return False
    matplotlib.rcParams["svg.hashsalt"] = "claims"
    label, scale, unit = UNITS[claim.metric]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(names), 3.4))
    seeds = sorted({s for v in values.values() for s in v})
    for seed in seeds:
        xs = [i for i, n in enumerate(names) if seed in values[n]]
        ys = [values[names[i]][seed] * scale for i in xs]
        ax.plot(xs, ys, "o-", color="0.6", alpha=0.6, markersize=4, linewidth=0.8)
    for i, n in enumerate(names):
        finite = [v * scale for v in values[n].values() if math.isfinite(v)]
        if finite:
            ax.plot([i - 0.2, i + 0.2], [statistics.fmean(finite)] * 2, color="C3", linewidth=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=7)
    ax.set_ylabel(f"{label}{' (%)' if unit == 'pp' else ''}", fontsize=8)
    ax.set_title(claim.id, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return True


def _blocks(
    registry: Registry,
    results: list[ClaimResult],
    arms: dict[str, ArmResult],
    records: list[dict[str, Any]],
    plots: dict[str, str],
    quick: bool,
) -> tuple[list[Block], list[Block]]:
    """The page's blocks, and the headline table's (for the README)."""
    blocks: list[Block] = [("h1", "The survey's claims, measured")]
    if quick:
        blocks.append(
            (
                "p",
                "**QUICK RUN (--quick): tiny budgets to show the pipeline works end to end. "
                "These numbers are not evidence for or against any claim.**",
            )
        )
    counts = verdict_counts(results)
    machines = sorted({r.get("machine") or "" for r in records} - {""})
    hours = _seconds(records) / 3600.0
    blocks.append(
        (
            "p",
            f"{len(results)} claims of the practitioner's survey, each a pre-registered "
            f"experiment in `{REGISTRY_SHOWN}` (written and committed before any run) on the "
            "embedded tasks, run by `python -m recipes.claims` on the comparison sweep's engine. "
            + ", ".join(f"{v}: {n}" for v, n in counts.items() if n)
            + ".",
        )
    )
    blocks.append(
        (
            "p",
            f"Measured: {len(records)} runs (LR-search runs included), {hours:.2f} h of "
            "run time in total, one run at a time, one torch thread per run"
            + (f", on {'; '.join(machines)}" if machines else "")
            + ". "
            "Every number here is read from the stored study (`study/` beside this page); "
            "`python -m recipes.claims --render-only` writes these pages again.",
        )
    )
    blocks.append(
        (
            "p",
            "Verdicts: the effect is arm minus comparison arm in the metric's units, its "
            "interval a two-sided 95% Student t interval over seeds, paired by seed when both "
            "arms ran the same seeds (Welch's interval otherwise; one-sample t for a claim about "
            "one arm). **supported**: the interval excludes 0 on the side the claim predicts; "
            "**contradicted**: it excludes 0 on the other side; **inconclusive**: it contains 0 "
            "(a difference inside the noise is no win); **untested**: the two arms gave the same "
            "value at every seed (every paired difference exactly 0: the treatment changed no "
            "run), so nothing was measured; combined with other comparisons it counts like "
            "inconclusive, never as support or contradiction. Each arm's LR was chosen on validation "
            "accuracy by the engine's LR search on the first seed (test data never chooses), "
            "unless the claim fixes it. The budgets are short: every verdict is about these "
            "shortened tasks, not the survey's settings.",
        )
    )
    header = ["claim", "task", "verdict", "effect", "95% CI", "seeds", "budget"]
    rows: list[list[Cell]] = []
    for result in results:
        claim = result.claim
        effects, intervals = [], []
        measured = [c for c in result.comparisons if c.raw is not None]
        if not measured:
            effects, intervals = ["—"], ["—"]
        for comparison in measured:
            effect, interval = _effect_text(claim, comparison)
            several = len(result.comparisons) > 1
            prefix = f"{_comparison_label(comparison)}: " if several else ""
            effects.append(prefix + effect)
            intervals.append(prefix + interval)
        tasks = list(dict.fromkeys(c.task for c in result.comparisons))
        rows.append(
            [
                Link(claim.id, f"#{_anchor(claim.id)}"),
                ", ".join(tasks),
                _verdict_text(result),
                "; ".join(effects),
                "; ".join(intervals),
                str(result.seeds) if result.seeds else "—",
                _budget_text(claim, arms),
            ]
        )
    headline_table: Block = ("table", (header, rows))
    blocks += [("h2", "Verdicts"), headline_table]

    blocks.append(("h2", "Budgets"))
    blocks.append(("anchor", "budgets"))
    search = (
        f"{registry.lr_trials} LR trials per searched arm on the first seed (the preset and "
        f"{registry.lr_trials - 1} log-uniform draws in [preset/{registry.lr_range:g}, "
        f"preset*{registry.lr_range:g}], seeded; {registry.pruner} pruner)"
    )
    blocks.append(
        (
            "table",
            (
                ["task", "recipe", "model and data", "budget per run"],
                [[t.name, t.recipe, t.title, t.budget] for t in registry.tasks.values()],
            ),
        )
    )
    blocks.append(
        (
            "p",
            f"LR search: {search}; seeds {', '.join(map(str, registry.seeds))}"
            + (" (quick: the first two)" if quick else "")
            + ". The LRs shown are each recipe's `--lr`; the ResNet recipe's is per 256 images, "
            "scaled linearly to the run's batch (128: half of it) unless an arm sets "
            "`--model.lr_scaling none`.",
        )
    )

    for result in results:
        claim = result.claim
        blocks.append(("h2", f"{claim.id}: {result.verdict}"))
        blocks.append(("anchor", _anchor(claim.id)))
        blocks.append(("quote", claim.quote))
        label = UNITS[claim.metric][0]
        blocks.append(
            (
                "p",
                f"Source: {claim.source} ({'listed in issue 25' if claim.origin == 'issue' else 'implied by the survey'}). "
                f"Metric: {label}; predicted: {claim.direction} for the first arm of each "
                f"comparison; combined: {claim.combine}."
                + (f" {claim.note}" if claim.note else ""),
            )
        )
        if len(result.per_task) > 1:
            blocks.append(
                (
                    "p",
                    "Per task: " + "; ".join(f"{t}: {v}" for t, v in result.per_task.items()) + ".",
                )
            )
        comp_rows: list[list[Cell]] = []
        for comparison in result.comparisons:
            effect, interval = _effect_text(claim, comparison)
            method = comparison.interval.method if comparison.interval else "—"
            if comparison.verdict == UNTESTED:
                method = "paired by seed, every difference 0"
            n = str(comparison.interval.n) if comparison.interval else "—"
            comp_rows.append(
                [
                    _comparison_label(comparison),
                    _fmt(claim.metric, comparison.means[0]),
                    _fmt(claim.metric, comparison.means[1]) if comparison.comparison.other else "0",
                    effect,
                    interval,
                    f"{method}, n={n}" if comparison.interval else "—",
                    comparison.verdict + (f" ({comparison.note})" if comparison.note else ""),
                ]
            )
        blocks.append(
            (
                "table",
                (
                    [
                        "comparison",
                        "arm mean",
                        "other mean",
                        "effect",
                        "95% CI",
                        "method",
                        "verdict",
                    ],
                    comp_rows,
                ),
            )
        )
        for comparison in result.comparisons:
            if comparison.verdict == UNTESTED:
                blocks.append(("p", _identical_text(registry, claim, comparison, arms)))
        names = list(dict.fromkeys(n for c in claim.comparisons for n in (c.arm, c.other) if n))
        arm_rows: list[list[Cell]] = []
        for name in names:
            arm = arms[name]
            values = arm.values(claim.metric)
            per_seed = ", ".join(f"{s}: {_fmt(claim.metric, v)}" for s, v in values.items()) or "—"
            arm_rows.append(
                [
                    Link(name, f"#arm-{name.replace('_', '-')}"),
                    arm.arm.title,
                    _lr_text(arm),
                    per_seed,
                    arm.status,
                ]
            )
        blocks.append(("table", (["arm", "what", "LR", "per seed", "status"], arm_rows)))
        if claim.id in plots:
            blocks.append(
                (
                    "figure",
                    (
                        plots[claim.id],
                        f"{claim.id}: per-seed {label}; grey lines join one seed, red bars are means",
                    ),
                )
            )

    blocks.append(("h2", "Arms and their runs"))
    for name, arm in arms.items():
        blocks.append(("h3", name))
        blocks.append(("anchor", f"arm-{name.replace('_', '-')}"))
        blocks.append(
            (
                "p",
                f"{arm.arm.title}. Task {arm.arm.task}, optimizer {arm.arm.optimizer}, LR {_lr_text(arm)}; {arm.status}"
                + (f"; failed runs: {', '.join(arm.failed)}" if arm.failed else "")
                + ".",
            )
        )
        run_rows: list[list[Cell]] = []
        for entry in arm.search:
            run_rows.append(
                [
                    Link(entry["key"], _records_link(name, entry["key"]))
                    if entry["record"]
                    else entry["key"],
                    "LR search",
                    f"{entry['lr']:.4g}" if entry["lr"] is not None else "—",
                    entry["status"],
                    f"{entry['value']:.4f}" if entry["value"] is not None else "—",
                ]
            )
        for seed, record in sorted(arm.runs.items()):
            if record["role"] == "lr-search":
                continue
            run_rows.append(
                [
                    Link(record["key"], _records_link(name, record["key"])),
                    f"seed {seed}",
                    f"{record['lr']:.4g}",
                    record["status"],
                    f"{record['value']:.4f}" if record["value"] is not None else "—",
                ]
            )
        if run_rows:
            blocks.append(("table", (["run", "role", "LR", "status", "final val acc"], run_rows)))
    blocks.append(("h2", "Reproduce"))
    blocks.append(
        (
            "code",
            "python -m recipes.claims                 # run the study, or resume it where it stopped\n"
            "python -m recipes.claims --render-only   # these pages again, from the stored study\n"
            "python -m recipes.claims --rerun ARM/KEY # one stored run again (e.g. "
            "resnet_nesterov_cosine/nesterov-seed43), compared with its record\n"
            "python -m recipes.claims --claims fp16_eps,cnn_warmup   # only these claims' arms\n"
            "python -m recipes.claims --quick --out reports/claims-quick   # tiny budget, no evidence",
        )
    )
    blocks.append(
        (
            "p",
            "The experiments are declared in `configs/claims.yaml`; each arm is one "
            "`recipes.compare` sweep (one optimizer) in its own Optuna study. The live storage and "
            "the runs' folders are in `reports/claims-work` (not committed); `study/study.db` is a "
            "consistent copy of that storage and `study/records/ARM/KEY.json` holds each finished "
            "run's command, test metrics and curves. In a fresh checkout the study command starts "
            "from the stored copy, so it resumes where the committed study ended. One run at a "
            "time and one torch thread per run make the runs deterministic on CPU; `--rerun` "
            "checks that.",
        )
    )
    return blocks, [headline_table]


def _budget_text(claim: Claim, arms: dict[str, ArmResult]) -> str:
    """The claim's tasks with the optimizer steps its arms' runs took (from the records)."""
    steps: dict[str, set[int]] = {}
    for comparison in claim.comparisons:
        for name in (comparison.arm, comparison.other):
            if name is None:
                continue
            arm = arms[name]
            found = steps.setdefault(arm.arm.task, set())
            found.update(int(r["global_step"]) for r in arm.runs.values() if r.get("global_step"))
    parts = []
    for task, counts in steps.items():
        shown = "/".join(str(c) for c in sorted(counts))
        parts.append(f"{task}, {shown} steps" if counts else task)
    return "; ".join(parts)


def _lr_text(arm: ArmResult) -> str:
    if not arm.arm.searched:
        return f"fixed {arm.arm.fixed_lr:g}"
    if arm.chosen_lr is None:
        return "searched (not chosen yet)"
    return f"searched: {arm.chosen_lr:.4g}"


def _md_cell(cell: Cell) -> str:
    text = f"[{cell.text}]({cell.href})" if isinstance(cell, Link) else cell
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(payload: tuple[list[str], list[list[Cell]]]) -> str:
    header, rows = payload
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _inline(text: str) -> str:
    """``**bold**`` and ```code``` of a paragraph as HTML, the rest escaped."""
    import re

    html = escape(text)
    html = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", html)


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Link):
        return f'<a href="{escape(cell.href)}">{escape(cell.text)}</a>'
    return escape(cell)


def _html_table(payload: tuple[list[str], list[list[Cell]]]) -> str:
    header, rows = payload
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_figure(payload: tuple[str, str]) -> str:
    src, caption = payload
    return (
        f'<figure><img src="{escape(src)}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


_MARKDOWN, _HTML = 0, 1
# Each kind of block in Markdown and in HTML (indexed by _MARKDOWN, _HTML).
_RENDERERS: dict[str, tuple[Callable[[Any], str], Callable[[Any], str]]] = {
    "h1": (lambda text: f"# {text}", lambda text: f"<h1>{escape(text)}</h1>"),
    "h2": (lambda text: f"## {text}", lambda text: f"<h2>{escape(text)}</h2>"),
    "h3": (lambda text: f"### {text}", lambda text: f"<h3>{escape(text)}</h3>"),
    "anchor": (lambda name: f'<a id="{name}"></a>', lambda name: f'<a id="{escape(name)}"></a>'),
    "p": (str, lambda text: f"<p>{_inline(text)}</p>"),
    "quote": (lambda text: f"> {text}", lambda text: f"<blockquote>{escape(text)}</blockquote>"),
    "code": (lambda text: f"```\n{text}\n```", lambda text: f"<pre>{escape(text)}</pre>"),
    "figure": (lambda figure: f"![{figure[1]}]({figure[0]})", _html_figure),
    "table": (_md_table, _html_table),
}


def _rendered(blocks: list[Block], markup: int) -> list[str]:
    """Each block of a known kind in ``markup`` (``_MARKDOWN`` or ``_HTML``)."""
    return [_RENDERERS[kind][markup](payload) for kind, payload in blocks if kind in _RENDERERS]


def _markdown(blocks: list[Block]) -> str:
    return "\n\n".join(_rendered(blocks, _MARKDOWN)) + "\n"


def _html(blocks: list[Block]) -> str:
    from recipes.pages.html import page

    titles = [payload for kind, payload in blocks if kind == "h1"]
    return page(titles[-1] if titles else "Claims", "\n".join(_rendered(blocks, _HTML)))


README_START = "<!-- claims headline: generated by python -m recipes.claims --render-only -->"
README_END = "<!-- end of claims headline -->"


def readme_with_headline(readme: str, headline: str) -> str:
    """``readme`` with the text between its headline markers replaced by ``headline`` (links
    made relative to the repository root); a README without the markers is refused."""
    if README_START not in readme or README_END not in readme:
        raise ValueError(
            f"readme: no {README_START!r} ... {README_END!r} block; allowed: a README with both"
        )
    before, rest = readme.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    table = headline.replace("](claims.md", "](docs/claims/claims.md")
    return f"{before}{README_START}\n{table}{README_END}{after}"


def write_report(out: Path, registry: Registry, registry_path: Path | None = None) -> Path:
    """Write ``claims.md``, ``claims.html``, ``headline.md`` and the plots under ``out`` from
    the stored study; the path of ``claims.md``."""
    out = Path(out)
    paths = StudyPaths(out / "study")
    manifest = paths.root / "study.json"
    quick = bool(json.loads(manifest.read_text()).get("quick")) if manifest.exists() else False
    arms = load_arms(paths, registry, quick)
    results = [evaluate(claim, arms) for claim in registry.claims]
    plots: dict[str, str] = {}
    plot_dir = out / "plots"
    for result in results:
        target = plot_dir / f"{result.claim.id}.svg"
        if _plot(result, arms, target):
            plots[result.claim.id] = f"plots/{target.name}"
        else:
            target.unlink(missing_ok=True)
    blocks, headline = _blocks(registry, results, arms, _all_records(paths), plots, quick)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(_markdown(blocks))
    (out / "claims.html").write_text(_html(blocks))
    (out / "headline.md").write_text(_markdown(headline).replace("](#", "](claims.md#"))
    summary = {
        r.claim.id: {
            "verdict": r.verdict,
            "per_task": r.per_task,
            "comparisons": [
                {
                    "arm": c.comparison.arm,
                    "other": c.comparison.other,
                    "verdict": c.verdict,
                    "effect": c.raw[0] if c.raw else None,
                    # identical runs (untested): a zero-width interval is no interval
                    "ci95": [c.raw[1], c.raw[2]] if c.raw and c.verdict != UNTESTED else None,
                    "method": c.interval.method if c.interval else None,
                    "n": c.interval.n if c.interval else None,
                }
                for c in r.comparisons
            ],
        }
        for r in results
    }
    (out / "claims.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return out / "claims.md"
