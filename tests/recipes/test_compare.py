"""The optimizer comparison sweep end to end: real recipe runs of a tiny random BERT (one process
per run, W&B offline), resumed and extended, with an LR search; the report's numbers are checked
against what W&B recorded, read back from its files with ``wandb leet inspect``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from recipes import compare
from recipes.sweep.lr_presets import LearningRate, choose_lr, lr_grid, preset_lrs
from recipes.sweep.processes import FolderLock
from tests.conftest import subprocess_env
from tests.recipes.browser import assert_rendered_pictures, render

LRS = "adamw=3e-3,sgd=0.3"
KEYS = {"adamw": "adamw-lr0.003-seed42", "sgd": "sgd-lr0.3-seed42"}


def sweep_args(tiny, out: Path, *extra: str) -> list[str]:
    model_dir, data = tiny
    return [
        *("--recipe", "bert_finetune", "--out", str(out), "--moment-every", "3", "--lrs", LRS),
        *("--data.dataset", str(data), "--data.model_name_or_path", str(model_dir)),
        *("--data.max_length", "24", "--data.batch_size", "8", "--trainer.accelerator", "cpu"),
        *("--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *("--trainer.num_sanity_val_steps", "0"),
        *extra,
    ]


def run_compare(args: list[str]) -> str:
    """``python -m recipes.compare ARGS`` in this process (each run is its own process); stdout.

    The runs use one thread: on a machine shared with other test processes, two OpenMP threads
    made a step of the tiny model 100x slower (2 s instead of 20 ms)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out):
        env.setenv("OMP_NUM_THREADS", "1")
        env.delenv("WANDB_DIR", raising=False)  # each run's W&B files go to its own folder
        compare.main(args)
    return out.getvalue()


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory):
    """adamw alone, then (an sgd run left unfinished meanwhile) adamw and sgd: the sweep resumes."""
    out = tmp_path_factory.mktemp("compare") / "sweep"
    first = run_compare(sweep_args(tiny, out, "--optimizers", "adamw"))
    adamw_dir = out / "runs" / KEYS["adamw"]
    adamw_files = {p: p.read_bytes() for p in adamw_dir.rglob("*") if _own_file(p)}
    unfinished = out / "runs" / KEYS["sgd"]
    unfinished.mkdir(parents=True)
    (unfinished / "leftover.txt").write_text("killed mid-run")
    second = run_compare(sweep_args(tiny, out, "--optimizers", "adamw,sgd"))
    return {
        "out": out,
        "first": first,
        "second": second,
        "adamw_files": adamw_files,
        "report": (out / "report.md").read_text(),
        "results": json.loads((out / "results.json").read_text()),
        "sweep": json.loads((out / "sweep.json").read_text()),
    }


def _own_file(path: Path) -> bool:
    """A file of the run itself: W&B links ``logs/debug-core.log`` to its service's shared log,
    which later runs keep appending to."""
    return path.is_file() and not path.is_symlink()


def logged(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(optimizer steps taken, value)`` of a metric in the W&B history."""
    rows = [r["history"]["item"] for r in records if r["type"] == "history"]
    return [(int(row["trainer/global_step"]) + 1, row[key]) for row in rows if key in row]


def adamw_state_bytes(model_dir: Path) -> int:
    """exp_avg and exp_avg_sq (float32, like each parameter) plus a float32 step per tensor."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    return sum(2 * p.numel() * 4 + 4 for p in model.parameters())


def test_report_numbers_equal_the_metrics_wandb_recorded(sweep, tiny, wandb_run):
    results, out = sweep["results"], sweep["out"]
    target = results["target_accuracy"]
    runs = {run["optimizer"]: run for run in results["runs"]}
    assert set(runs) == {"adamw", "sgd"} and all(r["status"] == "finished" for r in runs.values())
    best_val = 0.0
    for run in runs.values():
        run_dir = out / "runs" / run["key"]
        records = wandb_run.records(run_dir)
        (header,) = [r["run"] for r in records if r["type"] == "run"]
        assert (
            header["run_group"] == sweep["sweep"]["group"] and header["display_name"] == run["key"]
        )

        val_acc = logged(records, "val_acc")
        assert [step for step, _ in val_acc] == [3, 6]  # 4 validations per 12-batch epoch
        # the last validation, even though test() restored the step-3 checkpoint's callbacks
        assert run["final_val_acc"] == pytest.approx(val_acc[-1][1], abs=1e-7)
        assert run["best_val_acc"] == pytest.approx(max(v for _, v in val_acc), abs=1e-7)
        assert run["final_val_loss"] == pytest.approx(logged(records, "val_loss")[-1][1], rel=1e-6)
        ((_, test_acc),) = logged(records, "test_acc")
        ((_, test_loss),) = logged(records, "test_loss")
        assert run["test_acc"] == pytest.approx(test_acc, abs=1e-7)
        assert run["test_loss"] == pytest.approx(test_loss, rel=1e-6)
        assert run["steps_to_target"] == next(s for s, v in val_acc if v >= target)
        best_val = max(best_val, run["best_val_acc"])

        recorded = json.loads((run_dir / "result.json").read_text())
        assert [tuple(p) for p in recorded["history"]["train_loss"]] == [
            (s - 1, pytest.approx(v, rel=1e-6)) for s, v in logged(records, "train_loss")
        ]  # the loss curve
        schedule = dict(map(tuple, recorded["lr_schedule"]))  # the LR plot
        assert len(schedule) == run["steps"] == 6
        for step, lr in logged(records, "lr/decay"):
            assert schedule[step - 1] == pytest.approx(lr, rel=1e-6)
        assert run["fit_seconds"] > 0 and run["step_seconds"] > 0 and run["peak_memory_bytes"] > 0

    assert target == pytest.approx(0.95 * best_val)
    assert runs["adamw"]["optimizer_state_bytes"] == adamw_state_bytes(tiny[0])
    assert runs["sgd"]["optimizer_state_bytes"] == 0  # momentum 0 keeps no buffer
    assert "moments/update_to_weight" in recorded["history"]
    for row in results["optimizers"]:  # one seed: the optimizer's mean is its run
        assert row["mean"]["test_acc"] == runs[row["optimizer"]]["test_acc"]
        assert math.isnan(row["std"]["test_acc"])


def test_report_shows_the_winner_the_table_and_the_plots(sweep):
    report, out, results = sweep["report"], sweep["out"], sweep["results"]
    first, second = results["optimizers"][:2]
    if round(first["mean"]["test_acc"], 4) == round(second["mean"]["test_acc"], 4):
        assert f"**Tie: {first['optimizer']}, {second['optimizer']}**" in report
    else:
        assert f"**Winner: {first['optimizer']}**" in report
    accuracies = [row["mean"]["test_acc"] for row in results["optimizers"]]
    assert accuracies == sorted(accuracies, reverse=True)
    table = [line for line in sweep["second"].splitlines() if line.startswith("|")]
    assert len(table) == 4 and "\n".join(table) in report  # printed as written
    for row, line in zip(results["optimizers"], table[2:], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].strip("*") == row["optimizer"]
        assert cells[4] == f"{row['mean']['final_val_acc']:.4f}"
        assert cells[5] == f"{row['mean']['test_acc']:.4f}"
    for name in ("curves.png", "runs.png", "lr_schedule.png", "moments.png"):
        assert f"![{name[:-4]}]({name})" in report
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000


def test_report_page_has_the_report_the_plots_and_each_runs_page(sweep):
    out, results = sweep["out"], sweep["results"]
    page = (out / "report.html").read_text()
    assert "Report page: file://" in sweep["second"]
    assert "<script" not in page and "https://" not in page and "http://" not in page
    assert page.count('<img src="data:image/png;base64,') == 4  # curves, each run, LR, moments
    for row in results["optimizers"]:
        assert (
            f"<td>{row['optimizer']}</td>" in page or f"<strong>{row['optimizer']}</strong>" in page
        )
    links = re.findall(r'<a href="([^"]+/run\.html)">', page)
    assert len(links) == 2  # one per run, relative, to the page each run wrote
    for link in links:
        assert not Path(link).is_absolute() and (out / link).is_file()


def test_report_and_run_pages_render_in_a_real_browser(sweep, tmp_path):
    out = sweep["out"]
    rendered = render(out / "report.html", tmp_path / "report.png")
    assert_rendered_pictures(rendered, minimum_images=4)
    assert "Optimizer comparison" in rendered.text


def test_rerun_keeps_finished_runs_and_restarts_unfinished_ones(sweep):
    out = sweep["out"]
    assert f"{KEYS['adamw']}: finished earlier, reused" in sweep["second"]
    assert f"{KEYS['sgd']}: running" in sweep["second"]
    adamw_dir = out / "runs" / KEYS["adamw"]
    now = {p: p.read_bytes() for p in adamw_dir.rglob("*") if _own_file(p)}
    assert now == sweep["adamw_files"]  # not one byte of the finished run changed
    assert len(list(adamw_dir.glob("wandb/offline-run-*"))) == 1
    sgd_dir = out / "runs" / KEYS["sgd"]
    assert not (sgd_dir / "leftover.txt").exists() and (sgd_dir / "result.json").is_file()
    assert not list(out.rglob("*.ckpt"))  # checkpoints deleted once a run finished
    assert sweep["sweep"]["main_runs"] == [KEYS["adamw"], KEYS["sgd"]]


def test_lr_search_keeps_the_lr_with_the_best_validation_accuracy(sweep, tiny, tmp_path, wandb_run):
    out = tmp_path / "search"
    shutil.copytree(sweep["out"], out)  # the sgd run at the preset LR is reused from there
    printed = run_compare(
        sweep_args(tiny, out, "--optimizers", "sgd", "--lr-search", "--lr-grid", "0.1,1")
    )
    assert f"{KEYS['sgd']}: finished earlier, reused" in printed
    state = json.loads((out / "sweep.json").read_text())
    entry = state["lr_search"]["sgd"]
    assert entry["grid"] == [0.03, 0.3]
    finals = {}
    for lr, key in zip(entry["grid"], entry["runs"], strict=True):
        records = wandb_run.records(out / "runs" / key)
        finals[lr] = (logged(records, "val_acc")[-1][1], logged(records, "val_loss")[-1][1])
    best = max(finals, key=lambda lr: (finals[lr][0], -finals[lr][1]))
    assert entry["chosen"] == best
    (row,) = json.loads((out / "results.json").read_text())["optimizers"]
    assert row["lr"] == best and row["lr_source"] == "best of 2 by validation accuracy"
    assert "## Learning-rate search" in (out / "report.md").read_text()


@pytest.mark.ddp
def test_a_sweep_of_ddp_runs_records_rank_zero_once(tiny, tmp_path, wandb_run):
    out = tmp_path / "ddp"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4")
    run_compare(sweep_args(tiny, out, "--optimizers", "adamw", *ddp))
    run_dir = out / "runs" / KEYS["adamw"]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 4
    log = (run_dir / "output.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # the second process did train
    records = wandb_run.records(run_dir)  # exactly one W&B run: rank zero's
    (row,) = json.loads((out / "results.json").read_text())["runs"]
    assert row["final_val_acc"] == pytest.approx(logged(records, "val_acc")[-1][1], abs=1e-7)
    assert row["test_acc"] == pytest.approx(logged(records, "test_acc")[-1][1], abs=1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("--optimizers", "adamw,sgdd"),
            "optimizers: unknown value 'sgdd'; allowed: ",
        ),
        (("--optimizers", "adamw,adamw"), "optimizers: got 'adamw,adamw', which names adamw twice"),
        (("--optimizers", "adamw", "--seeds", "0"), "seeds: got 0; allowed: an integer >= 1"),
        (
            ("--optimizers", "adamw", "--lr", "1e-3"),
            "lr: got '--lr'; the sweep sets it for each run; allowed: --lrs NAME=LR or --lr-search",
        ),
        (
            ("--optimizers", "adamw", "--lr-grid", "1,-3"),
            "lr-grid: got '1,-3'; allowed: comma-separated numbers > 0 such as 0.3,1,3",
        ),
        (
            ("--optimizers", "adamw", "--target-accuracy", "1.5"),
            "target-accuracy: got 1.5; allowed: a number in (0.0, 1.0]",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_option(tiny, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        compare.main(sweep_args(tiny, tmp_path / "out", *extra))
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"python -m recipes.compare: error: {message}")
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_and_optimizer_suggest_the_closest_name(tiny, tmp_path, capsys):
    for args, expected in (
        (["--recipe", "bert", "--optimizers", "adamw"], "did you mean 'bert_finetune'?"),
        (["--recipe", "bert_finetune", "--optimizers", "nesterow"], "did you mean 'nesterov'?"),
    ):
        with pytest.raises(SystemExit):
            compare.main(args)
        assert capsys.readouterr().err.strip().endswith(expected)


def test_a_folder_holding_another_sweep_is_refused(sweep, tiny, capsys):
    args = sweep_args(tiny, sweep["out"], "--optimizers", "adamw", "--data.max_length", "32")
    with pytest.raises(SystemExit) as stop:
        compare.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"out: '{sweep['out']}' holds a sweep of bert_finetune with the options" in err
    assert err.endswith("allowed: the same recipe and options, or another --out")


def test_a_usage_error_in_a_run_stops_the_sweep_with_the_recipes_message(tiny, tmp_path, capsys):
    args = sweep_args(tiny, tmp_path / "out", "--optimizers", "adamw,sgd")
    with pytest.raises(SystemExit) as stop:
        run_compare([*args, "--data.text_column", "body"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m recipes.compare: error: text_column: ")
    assert "'body'" in line
    assert not (tmp_path / "out" / "runs" / KEYS["sgd"]).exists()  # sgd never started


@pytest.mark.parametrize("devices", [1, 2], ids=["one_process", "ddp"])
def test_a_killed_sweep_leaves_no_process_and_its_folder_is_locked_while_alive(
    tiny, tmp_path, capsys, devices
):
    out = tmp_path / "killed"
    endless = (
        "--optimizers",
        "adamw",
        "--trainer.max_steps",
        "100000",
        "--trainer.max_epochs",
        "-1",
    )
    if devices == 2:
        endless += ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    sweep = subprocess.Popen(
        [sys.executable, "-m", "recipes.compare", *sweep_args(tiny, out, *endless)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid_file = out / "runs" / KEYS["adamw"] / "pid"
        deadline = time.monotonic() + 120
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        child = int(pid_file.read_text())
        assert _alive(child)
        ranks = [child]
        while devices == 2 and len(ranks) < 2 and time.monotonic() < deadline:
            ranks = [child, *_children(child)]  # rank 1, started by rank 0's Lightning
            time.sleep(0.2)
        assert len(ranks) == devices
        # a second sweep on the folder in use: one line, exit status 2
        with pytest.raises(SystemExit) as exit_info:
            compare.main(sweep_args(tiny, out, "--optimizers", "adamw"))
        assert exit_info.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"out: '{out}' is in use by a running sweep (process {sweep.pid})" in line
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, ranks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphaned = [pid for pid in ranks if _alive(pid)]
    for pid in orphaned:
        os.kill(pid, signal.SIGKILL)
    assert orphaned == []  # the kernel killed the run (every rank of it) with its sweep
    with FolderLock(out):  # the dead sweep's lock is taken over
        pass


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False


def test_presets_scale_the_recipe_lr_by_each_optimizers_rule_of_thumb():
    presets = preset_lrs(
        ["adamw", "adam", "sgd", "nesterov", "adagrad", "adadelta"], "adamw", 1e-4, {"adam": 5e-5}
    )
    assert presets["adamw"] == LearningRate(1e-4, "recipe")
    assert presets["adam"] == LearningRate(5e-5, "--lrs")
    assert presets["sgd"].value == 0.1 and presets["nesterov"].value == 0.01
    assert presets["adagrad"].value == 1e-3
    assert presets["adadelta"] == LearningRate(1.0, "registry default")  # no global LR
    from_cnn = preset_lrs(["adamw", "sgd"], "nesterov", 0.1)  # a CNN recipe's SGD preset
    assert from_cnn["adamw"].value == 1e-3 and from_cnn["sgd"].value == 1.0
    assert lr_grid(0.01, (0.3, 1, 3)) == [0.003, 0.01, 0.03]


def test_choose_lr_prefers_accuracy_then_loss_and_skips_nan():
    assert choose_lr({0.1: (0.8, 0.5), 0.3: (0.9, 0.7), 1.0: (math.nan, math.nan)}) == 0.3
    assert choose_lr({0.1: (0.9, 0.4), 0.3: (0.9, 0.7)}) == 0.1
    assert choose_lr({0.1: (math.nan, 1.0)}) is None


def test_every_registry_entry_has_a_sweep_lr_rule_and_schedule_free_runs_are_constant():
    from optim_callbacks import OPTIMIZERS
    from recipes.sweep.lr_presets import LR_SCALE
    from recipes.sweep.plan import PlannedRun

    assert set(LR_SCALE) == set(OPTIMIZERS.names())
    assert LR_SCALE["lion"] < LR_SCALE["adamw"]  # Lion's LR is several times smaller
    lr = LearningRate(3e-3, "preset")
    args = PlannedRun("schedule_free_adamw", lr, 0, "compare").recipe_args(
        ["--scheduler", "cosine"]
    )
    assert args[args.index("--optimizer") :] == [
        "--optimizer", "schedule_free_adamw", "--lr", "0.003",
        "--scheduler", "constant", "--seed_everything", "0",
    ]  # fmt: skip
    assert "constant" not in PlannedRun("adamw", lr, 0, "compare").recipe_args([])
