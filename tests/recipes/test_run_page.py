"""A recipe run's page and dashboards, end to end: one tiny-BERT run with W&B offline, an
Adam→SGD switch halfway and clipping on; its W&B run read back with ``wandb leet inspect``,
its ``run.html`` read as HTML and opened in a real headless Chromium."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from optim_callbacks.moment_math import STATISTICS
from recipes import run_page
from recipes.bert_finetune import run
from recipes.pages.run_page import PAGE_FILE
from recipes.pages.run_record import read_run_record
from tests.recipes.browser import assert_rendered_pictures, render
from tests.recipes.tiny_text import tiny_args


@pytest.fixture(scope="module")
def page_run(tiny, tmp_path_factory):
    model_dir, data = tiny
    root = tmp_path_factory.mktemp("page_run")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out):
        env.setenv("WANDB_MODE", "offline")
        cli = run(
            tiny_args(
                model_dir,
                data,
                *("--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root)),
                *("--moment_stats.every_n_steps", "2", "--adam_to_sgd.at_fraction", "0.5"),
            )
        )
    printed = out.getvalue()
    folder = Path(re.search(r"Run page: file://(\S+)", printed).group(1)).parent
    return {"cli": cli, "printed": printed, "folder": folder, "root": root}


class Page(HTMLParser):
    """The parts of a page the tests read: section titles, table rows, images, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.rows: list[list[str]] = []
        self.images: list[dict[str, str]] = []
        self.scripts = 0
        self._tag: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "tr":
            self.rows.append([])
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        if self._tag == "h2":
            self.sections.append(data.strip())
        elif self._tag in ("td", "th") and self.rows:
            self.rows[-1].append(data.strip())

    def handle_endtag(self, tag):
        self._tag = None


def test_the_run_ends_naming_its_page_next_to_the_wandb_lines(page_run):
    lines = page_run["printed"].splitlines()
    upload = next(i for i, line in enumerate(lines) if line.startswith("  upload: wandb sync "))
    page_line = next(i for i, line in enumerate(lines) if line.startswith("Run page: file://"))
    assert page_line > upload
    assert lines[page_line + 1] == f"  draw again: python -m recipes.run_page {page_run['folder']}"
    folder = page_run["folder"]
    assert (folder / "checkpoints").is_dir() and (folder / "config.yaml").is_file()
    assert (folder / PAGE_FILE).is_file() and (folder / "run_record.json").is_file()


def test_wandb_holds_few_metrics_and_the_heatmaps_as_images(page_run, wandb_run):
    rows = wandb_run.history(page_run["root"])
    keys = wandb_run.metric_keys(rows)
    moments = {k for k in keys if k.startswith("moments")}
    heatmaps = {k for k in keys if k.startswith("heatmaps/")}
    assert moments and all(k.startswith("moments/") for k in moments)  # no per-layer keys
    # Per-layer scalars off: for each statistic one curve and one heatmap, whatever the number
    # of layers (22 here), plus the headline curves: a small multiple of the statistics.
    statistics = {k.removeprefix("heatmaps/") for k in heatmaps}
    assert len(statistics) >= len(STATISTICS)  # percentiles and state norms count apart
    assert {k.removeprefix("moments/") for k in moments} == statistics | {
        "grad_norm_before_clipping",
        "log10_step_size",
    }
    assert len(keys) <= 4 * len(statistics)
    assert {"heatmaps/update_to_weight", "heatmaps/step_size_p50"} <= heatmaps
    pngs = {p.stem for p in (page_run["folder"] / "heatmaps").glob("*.png")}
    assert {k.removeprefix("heatmaps/") for k in heatmaps} == pngs
    (image,) = [row for row in rows if "heatmaps/update_to_weight._type" in row]  # at the end
    assert image["heatmaps/update_to_weight._type"] == "image-file"
    assert image["heatmaps/update_to_weight.width"] == 900
    summary = wandb_run.summary(page_run["root"])
    assert "test_acc" in summary and "moments/update_to_weight" in summary
    assert not [k for k in summary if k.startswith("heatmaps/") or "log10_step_size" in k]


def test_the_page_shows_what_the_run_did(page_run):
    folder, cli = page_run["folder"], page_run["cli"]
    text = (folder / PAGE_FILE).read_text()
    page = Page(text)
    assert page.sections[:4] == ["Findings", "Test results", "Curves", "Events"]
    record = read_run_record(folder)  # the findings in words, and SpikeSkip's count
    assert record["spikes"]["skipped"] == 0 and record["spike_events"] == []
    assert all(set(f) == {"rule", "seen", "cause", "try"} for f in record["findings"])
    assert {"Layers × steps", "Where the run lives", "Configuration (config.yaml)"} <= set(
        page.sections
    )
    assert page.scripts == 0 and "http://" not in text and "https://" not in text
    assert all(image["src"].startswith("data:image/png;base64,") for image in page.images)
    heatmaps = {p.stem for p in (folder / "heatmaps").glob("*.png")}
    assert len(page.images) == 1 + len(heatmaps)  # the curves, then one per statistic
    assert [i["alt"] for i in page.images][1:3] == [
        "heatmap of update_to_weight",
        "heatmap of step_size_p50",
    ]
    cells = {row[0]: row[1:] for row in page.rows if row}
    assert cells["accuracy"] == [f"{cli.test_results['test_acc']:.4g}"]
    # AdamToSGD switched at half of the 48 steps
    (event,) = [row for row in page.rows if row[1:2] == ["optimizer switch"]]
    assert event[0] == "24" and event[2] == "AdamW → SGD"
    assert any(row[1:2] == ["heavy clipping"] for row in page.rows)
    wandb_dir = next(r[1] for r in page.rows if r[0] == "W&B run (offline)")
    assert cells["view in the terminal"] == [f"wandb leet {wandb_dir}"]
    assert Path(wandb_dir).is_dir()
    assert cells["best checkpoint"][0].startswith("checkpoints/")
    assert "adam_to_sgd:" in text and "at_fraction: 0.5" in text  # config.yaml


def test_the_page_is_drawn_again_from_the_run_folder_alone(page_run, tmp_path, capsys):
    copy = tmp_path / "moved"
    shutil.copytree(page_run["folder"], copy, ignore=shutil.ignore_patterns("*.ckpt"))
    (copy / PAGE_FILE).unlink()
    for png in (copy / "heatmaps").glob("*.png"):
        png.unlink()
    run_page.main(["--redraw-heatmaps", str(copy)])
    assert capsys.readouterr().out == f"Run page: {(copy / PAGE_FILE).resolve().as_uri()}\n"
    assert len(list((copy / "heatmaps").glob("*.png"))) == len(
        list((page_run["folder"] / "heatmaps").glob("*.png"))
    )
    again, first = (
        Page((copy / PAGE_FILE).read_text()),
        Page((page_run["folder"] / PAGE_FILE).read_text()),
    )
    assert again.sections == first.sections and len(again.images) == len(first.images)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage: python -m recipes.run_page [--redraw-heatmaps] RUN_FOLDER"),
        (["nowhere"], "python -m recipes.run_page: error: folder: got 'nowhere', which has no "),
    ],
)
def test_run_page_usage_errors_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        run_page.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_the_page_renders_in_a_real_browser(page_run, tmp_path):
    folder = page_run["folder"]
    rendered = render(folder / PAGE_FILE, tmp_path / "run.png")
    heatmaps = len(list((folder / "heatmaps").glob("*.png")))
    assert_rendered_pictures(rendered, minimum_images=1 + heatmaps)
    assert {i["width"] for i in rendered.images[1:]} == {900}  # every heatmap decoded whole
    assert "Test results" in rendered.text and "optimizer switch" in rendered.text
