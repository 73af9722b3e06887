"""The optimizer comparison sweep on Optuna, end to end: real recipe runs of a tiny random BERT
(one process per run, W&B offline) in real studies, SQLite and a throwaway PostgreSQL server.

One finished sweep (:func:`sweep`, SQLite, one worker) is shared: its report is checked against
what W&B recorded, its study against the plan and the dashboard, and it is the oracle the
other sweeps must equal: two workers on PostgreSQL with one SIGKILLed mid-trial, and two local
workers whose whole sweep is SIGKILLed and run again. Every command of ``docs/sweep.md`` is one
of the ``DOC_*`` commands below, run here with the tiny model and data appended.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from recipes import compare
from recipes.sweep.lr_presets import LearningRate, choose_lr, lr_grid, preset_lrs, sampled_lrs
from recipes.sweep.plan import plan_sweep, run_args
from recipes.sweep.storage import masked_url, open_storage, storage_url
from recipes.sweep.study import current_trials
from tests.conftest import REPO_ROOT, subprocess_env
from tests.recipes.browser import assert_rendered_pictures, render
from tests.recipes.postgres import PASSWORD, free_port, postgres_server

DOCS = REPO_ROOT / "docs" / "sweep.md"
# The commands of docs/sweep.md, as written there.
DOC_SWEEP = (
    "python -m recipes.compare --recipe bert_finetune --optimizers adamw,sgd "
    "--lrs adamw=3e-3,sgd=0.3 --lr-trials 2 --pruner none --out reports/adamw_sgd"
)
DOC_POSTGRES = f"{DOC_SWEEP} --storage postgresql://sweep@db-host:5432/sweeps"
DOC_JOIN = (
    "python -m recipes.compare --join --storage postgresql://sweep@db-host:5432/sweeps "
    "--out reports/adamw_sgd"
)
DOC_TWO_WORKERS = (
    "python -m recipes.compare --recipe bert_finetune --optimizers adamw --lrs adamw=3e-3 "
    "--lr-trials 2 --seeds 2 --pruner none --workers 2 --out reports/adamw_seeds"
)
DOC_PRUNE = (
    "python -m recipes.compare --recipe bert_finetune --optimizers adamw --lrs adamw=3e-3 "
    "--lr-grid 1,1000 --out reports/adamw_search"
)
DOC_REPORT = "python -m recipes.report reports/adamw_sgd"
DOC_DASHBOARD = "optuna-dashboard sqlite:///reports/adamw_sgd/study.db --port 8080"
DOC_COMMANDS = (
    DOC_SWEEP,
    DOC_POSTGRES,
    DOC_JOIN,
    DOC_TWO_WORKERS,
    DOC_PRUNE,
    DOC_REPORT,
    DOC_DASHBOARD,
)
HEARTBEAT = ("--heartbeat", "2")  # a dead worker's trial is taken over after 6 s


def tiny_options(tiny) -> list[str]:
    """The recipe options that make every run of the tests tiny: 6 steps of a random 2-layer
    BERT, validations at steps 3 and 6, a rolling last.ckpt every 2 steps."""
    model_dir, data = tiny
    return [
        *("--moment-every", "3"),
        *("--data.dataset", str(data), "--data.model_name_or_path", str(model_dir)),
        *("--data.max_length", "24", "--data.batch_size", "8", "--trainer.accelerator", "cpu"),
        *("--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *("--trainer.num_sanity_val_steps", "0", "--last_checkpoint.every_n_train_steps", "2"),
    ]


def command_args(doc: str, out: Path, storage: str | None = None, tiny=None) -> list[str]:
    """A documented sweep command as arguments: ``--out`` (and ``--storage``) replaced, the
    tiny options appended (a worker that joins takes them from the study)."""
    args = shlex.split(doc)[3:]  # after "python -m recipes.compare"
    args[args.index("--out") + 1] = str(out)
    if storage is not None:
        args[args.index("--storage") + 1] = storage
    if "--join" not in args and tiny is not None:
        args += tiny_options(tiny)
    return args


def run_compare(args: list[str]) -> str:
    """``python -m recipes.compare ARGS`` in this process (each run is its own process); stdout."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out):
        env.setenv("OMP_NUM_THREADS", "1")
        env.delenv("WANDB_DIR", raising=False)  # each run's W&B files go to its own folder
        compare.main(args)
    return out.getvalue()


def start_compare(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """``python -m recipes.compare ARGS`` as its own process (a worker the test may kill)."""
    child_env = subprocess_env(**env)
    child_env.pop("WANDB_DIR", None)
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "recipes.compare", *args],
            env=child_env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def study_of(out: Path, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=out.name, storage=open_storage(storage_url(storage, out)))


@pytest.fixture(scope="module")
def sweep(tiny, tmp_path_factory):
    """DOC_SWEEP on SQLite with one worker: adamw and sgd, each an LR search of 2 trials."""
    out = tmp_path_factory.mktemp("compare") / "adamw_sgd"
    args = command_args(DOC_SWEEP, out, tiny=tiny)
    printed = run_compare(args)
    study = study_of(out)
    return {
        "out": out,
        "args": args,
        "printed": printed,
        "report": (out / "report.md").read_text(),
        "results": json.loads((out / "results.json").read_text()),
        "study": study,
        "trials": current_trials(study.get_trials()),
    }


# --- the shared sweep: plan, study, report ---------------------------------------------------
def test_the_study_holds_the_planned_trials_and_the_seeded_sampler_repeats_them(sweep):
    plan, _ = plan_sweep(sweep["args"])
    again, _ = plan_sweep(sweep["args"])
    assert plan.trials == again.trials  # the same command gives the same trials
    other, _ = plan_sweep([*sweep["args"], "--sampler-seed", "1"])
    assert [t.lr for t in other.trials] != [t.lr for t in plan.trials]
    trials = sweep["trials"]
    assert list(trials) == [t.key for t in plan.trials]  # queued in plan order, each once
    for planned in plan.trials:
        trial = trials[planned.key].trial
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.params == {"optimizer": planned.optimizer, "lr": planned.lr, "seed": 42}
    assert len(sweep["study"].get_trials()) == 4  # nothing ran twice
    # the preset first, then a draw log-uniform in [preset / 10, preset * 10]
    for name, preset in (("adamw", 3e-3), ("sgd", 0.3)):
        lrs = plan.search[name]["lrs"]
        assert lrs[0] == preset and preset / 10 <= lrs[1] <= preset * 10
        assert lrs == sampled_lrs(name, preset, 2, 10.0, 0)
        assert sampled_lrs(name, preset, 4, 10.0, 0)[:2] == lrs  # more trials extend it


def test_report_numbers_equal_the_metrics_wandb_recorded(sweep, tiny, wandb_run):
    results, out = sweep["results"], sweep["out"]
    target = results["target_accuracy"]
    runs = {run["optimizer"]: run for run in results["runs"]}
    assert set(runs) == {"adamw", "sgd"} and all(r["status"] == "finished" for r in runs.values())
    group = sweep["study"].user_attrs["settings"]["group"]
    best_val = max(r["best_val_acc"] for r in results["lr_search_runs"])
    for run in runs.values():
        run_dir = out / "runs" / run["key"]
        records = wandb_run.records(run_dir)
        (header,) = [r["run"] for r in records if r["type"] == "run"]
        assert header["run_group"] == group and header["display_name"] == run["key"]
        val_acc = logged(records, "val_acc")
        assert [step for step, _ in val_acc] == [3, 6]  # 4 validations per 12-batch epoch
        assert run["final_val_acc"] == pytest.approx(val_acc[-1][1], abs=1e-7)
        assert run["best_val_acc"] == pytest.approx(max(v for _, v in val_acc), abs=1e-7)
        assert run["final_val_loss"] == pytest.approx(logged(records, "val_loss")[-1][1], rel=1e-6)
        ((_, test_acc),) = logged(records, "test_acc")
        assert run["test_acc"] == pytest.approx(test_acc, abs=1e-7)
        assert run["steps_to_target"] == next((s for s, v in val_acc if v >= target), None)
        recorded = json.loads((run_dir / "result.json").read_text())
        schedule = dict(map(tuple, recorded["lr_schedule"]))
        assert len(schedule) == run["steps"] == 6
        for step, lr in logged(records, "lr/decay"):
            assert schedule[step - 1] == pytest.approx(lr, rel=1e-6)
        assert run["fit_seconds"] > 0 and run["step_seconds"] > 0 and run["peak_memory_bytes"] > 0
        # the study's value of the trial is the run's final validation accuracy
        assert sweep["trials"][run["key"]].trial.value == pytest.approx(run["final_val_acc"])
    assert target == pytest.approx(0.95 * best_val)
    assert runs["adamw"]["optimizer_state_bytes"] == adamw_state_bytes(tiny[0])
    assert runs["sgd"]["optimizer_state_bytes"] == 0  # momentum 0 keeps no buffer
    assert not list(out.rglob("*.ckpt"))  # checkpoints deleted once a run finished


def test_the_lr_search_chooses_by_validation_and_the_report_shows_it(sweep):
    results, report, trials = sweep["results"], sweep["report"], sweep["trials"]
    for name in ("adamw", "sgd"):
        search = {r["key"]: r for r in results["lr_search_runs"] if r["optimizer"] == name}
        assert len(search) == 2
        finals = {r["lr"]: (r["final_val_acc"], r["final_val_loss"]) for r in search.values()}
        best = choose_lr(finals)
        assert results["chosen_lrs"][name] == best
        (row,) = [r for r in results["runs"] if r["optimizer"] == name]
        assert row["lr"] == best and row["key"] == f"{name}-lr{best:g}-seed42"
        assert row["lr_source"] == "best of 2 by validation accuracy"
        for key, run in search.items():
            assert trials[key].trial.value == pytest.approx(run["final_val_acc"])
    assert "## Learning-rate search" in report and "![lr_search](lr_search.png)" in report
    assert "adamw: 2 trials, log-uniform in [0.0003, 0.03]" in report
    assert "sgd: 2 trials, log-uniform in [0.03, 3]" in report
    assert report.count("| finished |") == 4
    # with two trials the best is at an edge of what was tried, for both optimizers
    assert "The best LR of adamw, sgd is at the edge of what was tried" in report


def test_report_shows_the_winner_the_table_the_plots_and_the_dashboard(sweep):
    report, out, results, printed = (
        sweep["report"],
        sweep["out"],
        sweep["results"],
        sweep["printed"],
    )
    first, second = results["optimizers"][:2]
    if round(first["mean"]["test_acc"], 4) == round(second["mean"]["test_acc"], 4):
        assert f"**Tie: {first['optimizer']}, {second['optimizer']}**" in report
    else:
        assert f"**Winner: {first['optimizer']}**" in report
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 4 and "\n".join(table) in report  # printed as written
    for name in ("curves.png", "runs.png", "lr_schedule.png", "moments.png", "lr_search.png"):
        assert f"]({name})" in report
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000
    assert "Optuna study `adamw_sgd` in `study.db` (SQLite, this folder)" in report
    assert (
        f"Look at the study: optuna-dashboard sqlite:///{(out / 'study.db').resolve()}" in printed
    )


def test_report_page_links_each_trials_run_page(sweep):
    out = sweep["out"]
    page = (out / "report.html").read_text()
    assert "<script" not in page and "https://" not in page and "http://" not in page
    assert page.count('<img src="data:image/png;base64,') == 5
    links = re.findall(r'<a href="([^"]+/run\.html)">', page)
    assert len(links) == 4  # every trial: both searches' runs
    for link in links:
        assert not Path(link).is_absolute() and (out / link).is_file()


def test_report_and_run_pages_render_in_a_real_browser(sweep, tmp_path):
    rendered = render(sweep["out"] / "report.html", tmp_path / "report.png")
    assert_rendered_pictures(rendered, minimum_images=5)
    assert "Optimizer comparison" in rendered.text


def test_the_report_command_writes_the_same_report_again(sweep, capsys):
    from recipes import report

    out = sweep["out"]
    args = shlex.split(DOC_REPORT)[3:]
    args[0] = str(out)
    before = (out / "results.json").read_text()
    report.main(args)
    assert (out / "results.json").read_text() == before
    assert "Report page: file://" in capsys.readouterr().out


def test_the_dashboard_lists_the_finished_trials(sweep, tmp_path):
    args = shlex.split(DOC_DASHBOARD)
    port = free_port()
    args[1] = f"sqlite:///{(sweep['out'] / 'study.db').resolve()}"
    args[args.index("--port") + 1] = str(port)
    executable = str(Path(sys.executable).parent / args[0])
    server = subprocess.Popen(
        [executable, *args[1:], "--host", "127.0.0.1", "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", wait=60)["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == "adamw_sgd"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    trials = detail["trials"]
    assert len(trials) == 4 and {t["state"] for t in trials} == {"Complete"}
    values = sorted(t["values"][0] for t in trials)
    assert values == sorted(t.trial.value for t in sweep["trials"].values())


# --- workers, faults, storage ------------------------------------------------------------------
def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` without what differs between equal sweeps: times, memory, paths, the
    trial numbers and takeovers."""
    varying = {
        "fit_seconds",
        "step_seconds",
        "peak_memory_bytes",
        "wandb_run_dir",
        "trial",
        "resumed_from_step",
    }

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in varying}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return value

    return clean(results)


def test_workers_never_claim_one_trial_twice_on_sqlite(tmp_path):
    """Four processes race to claim 60 queued trials (``tests/scripts/sweep_claims.py``): each
    trial is claimed exactly once. Without ``BEGIN IMMEDIATE`` SQLite let two processes claim
    one trial (44 claims of 40 trials in a trial run)."""
    url = storage_url(None, tmp_path)
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for index in range(60):
        study.enqueue_trial({"x": index})
    start_at = str(time.time() + 12)  # after every process has imported and loaded the study
    script = str(REPO_ROOT / "tests" / "scripts" / "sweep_claims.py")
    processes = [
        subprocess.Popen(
            [sys.executable, script, url, start_at],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    claimed = [n for p in processes for n in json.loads(p.communicate(timeout=300)[0])]
    assert sorted(claimed) == list(range(60))


def test_processes_opening_a_new_database_at_once_all_open_it(tmp_path):
    """Four processes open one new SQLite study file at the same instant, as a sweep's first
    worker and one joining it (or the dashboard) may: each creates Optuna's tables, and all
    but one lose that race. Each then opens what the winner made. Without the retry, 5 of 12
    such opens failed ('table trials already exists', 'UNIQUE constraint failed:
    alembic_version.version_num')."""
    script = str(REPO_ROOT / "tests" / "scripts" / "sweep_claims.py")
    start_at = str(time.time() + 8)  # after every process has imported
    processes = []
    for database in range(3):  # three new files, four processes each
        (tmp_path / str(database)).mkdir()
        url = storage_url(None, tmp_path / str(database))
        processes += [
            subprocess.Popen(
                [sys.executable, script, url, start_at, "open"],
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and json.loads(out) == 0, err[-2000:]


def test_two_workers_on_postgres_one_killed_mid_trial_equal_one_worker(sweep, tiny, tmp_path):
    out = tmp_path / "adamw_sgd"
    with postgres_server() as url:
        bare = url.replace(f":{PASSWORD}@", "@")
        first = start_compare(
            [*command_args(DOC_POSTGRES, out, url, tiny), *HEARTBEAT], tmp_path, tmp_path / "a.log"
        )
        study = _wait_for_study(out.name, url, first)
        joined = start_compare(
            [*command_args(DOC_JOIN, out, bare), *HEARTBEAT],
            tmp_path,
            tmp_path / "b.log",
            PGPASSWORD=PASSWORD,  # the documented way: no password in the URL
        )
        try:
            victim = _running_with_checkpoint(study, out, joined.pid, timeout=600, process=joined)
            os.kill(joined.pid, signal.SIGKILL)  # the worker that joined, mid-trial
            joined.wait()
            assert first.wait(timeout=900) == 0, (tmp_path / "a.log").read_text()[-3000:]
        finally:
            for process in (first, joined):
                if process.poll() is None:
                    process.kill()
        trials = study.get_trials()
        assert not _alive(victim.user_attrs["pid"])  # its run died with its worker
        (dead,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert dead.number == victim.number
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
        assert retry.state == optuna.trial.TrialState.COMPLETE
        assert retry.user_attrs["key"] == dead.user_attrs["key"]
        assert 2 <= retry.user_attrs["resumed_from_step"] < 6  # from the dead one's last.ckpt
        assert f":{first.pid}/" in retry.user_attrs["worker"]  # taken over by the live worker
        printed = (tmp_path / "a.log").read_text()
        assert f"resuming from step {retry.user_attrs['resumed_from_step']}" in printed
        assert PASSWORD not in json.dumps(study.user_attrs)  # the study keeps none either
    results = json.loads((out / "results.json").read_text())
    assert comparable(results) == comparable(sweep["results"])  # same trials, same metrics
    assert _section(out / "report.md", "## Learning-rate search") == _section(
        sweep["out"] / "report.md", "## Learning-rate search"
    )
    assert "taken over at step" in (out / "report.md").read_text()
    # the password is nowhere: not printed, not in the report, the study or any run's files
    assert PASSWORD not in printed + (tmp_path / "b.log").read_text()
    assert "postgresql+psycopg://sweep:***@127.0.0.1" in printed
    for path in out.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_two_local_workers_then_a_killed_sweep_resumes_when_run_again(sweep, tiny, tmp_path):
    """Two workers; the whole sweep is SIGKILLed once a run is mid-run with a checkpoint (the
    other worker's run may be anywhere then). Every trial left running is taken over by the
    same command run again, from its last.ckpt where it wrote one, and the results equal the
    one-worker sweep's."""
    out = tmp_path / "adamw_seeds"
    csv = ("--logger", "csv")  # W&B's start and finish are tested elsewhere
    args = [*command_args(DOC_TWO_WORKERS, out, tiny=tiny), *csv, *HEARTBEAT]
    process = start_compare(args, tmp_path, tmp_path / "killed.log")
    study = _wait_for_study(out.name, None, process, out)
    try:
        _running_with_checkpoint(study, out, process.pid, timeout=600, process=process)
        os.kill(process.pid, signal.SIGKILL)  # the whole sweep, both workers
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    resumable = [  # what a takeover resumes from: any last.ckpt
        t
        for t in running
        if list((out / "runs" / t.user_attrs.get("key", "")).glob("**/last.ckpt"))
    ]
    assert any(_mid_run_step(out, t) is not None for t in running)  # the one the kill waited for
    pids = [t.user_attrs["pid"] for t in running if "pid" in t.user_attrs]
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, pids))  # no orphan: the kernel ended the runs with the sweep

    printed = run_compare(args)  # the same command again
    assert printed.count("resuming from step") == len(resumable)
    trials = current_trials(study.get_trials())
    assert [t.status for t in trials.values()] == ["finished"] * 3
    assert sorted(
        t.trial.system_attrs["failed_trial"]
        for t in trials.values()
        if "failed_trial" in t.trial.system_attrs
    ) == sorted(t.number for t in running)
    results = json.loads((out / "results.json").read_text())
    # the search runs equal the one-worker sweep's adamw runs, resumed or not (steps to the
    # target aside: the target is relative to the best run of each sweep)
    oracle = {r["key"]: r for r in comparable(sweep["results"])["lr_search_runs"]}
    for run in comparable(results)["lr_search_runs"]:
        assert {**run, "steps_to_target": None} == {**oracle[run["key"]], "steps_to_target": None}
    assert results["chosen_lrs"]["adamw"] == sweep["results"]["chosen_lrs"]["adamw"]
    (seed_run,) = [r for r in results["runs"] if r["seed"] == 43]
    assert seed_run["key"] == "adamw-seed43" and seed_run["lr"] == results["chosen_lrs"]["adamw"]
    # 3 planned + one retry per trial the kill left running; nothing planned twice
    assert len(study.get_trials()) == 3 + len(running)


def test_pruning_stops_the_run_at_a_diverging_lr(tiny, tmp_path):
    """AdamW at 3e-3 learns the keywords within two epochs (48 steps of 4); at 3.0 it never
    does: the median pruner stops it at the first validation where it is behind."""
    out = tmp_path / "adamw_search"
    longer = ["--trainer.max_steps", "48", "--trainer.max_epochs", "2", "--data.batch_size", "4"]
    longer += ["--logger", "csv"]  # W&B's start and finish are tested elsewhere
    printed = run_compare([*command_args(DOC_PRUNE, out, tiny=tiny), *longer])
    trials = current_trials(study_of(out).get_trials())
    good, diverging = trials["adamw-lr0.003-seed42"], trials["adamw-lr3-seed42"]
    assert good.status == "finished" and diverging.status == "pruned"
    step = diverging.trial.user_attrs["pruned_at_step"]
    assert step in diverging.trial.intermediate_values and step < 48
    assert good.trial.intermediate_values[step] > max(diverging.trial.intermediate_values.values())
    assert sorted(good.trial.intermediate_values) == [6, 12, 18, 24, 30, 36, 42, 48]
    result = json.loads((out / "runs" / diverging.key / "result.json").read_text())
    assert result["global_step"] == step and result["pruned_at_step"] == step  # it stopped there
    assert f"pruned at step {step}" in printed
    report = (out / "report.md").read_text()
    assert "| adamw | 3 | " in report and f"| pruned at step {step} |" in report
    assert json.loads((out / "results.json").read_text())["chosen_lrs"] == {"adamw": 0.003}


# --- usage and storage errors -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--optimizers", "adamw,sgdd"), "optimizers: unknown value 'sgdd'; allowed: "),
        (("--optimizers", "adamw,adamw"), "optimizers: got 'adamw,adamw', which names adamw twice"),
        (("--optimizers", "adamw", "--seeds", "0"), "seeds: got 0; allowed: an integer >= 1"),
        (
            ("--optimizers", "adamw", "--lr", "1e-3"),
            "lr: got '--lr'; the sweep sets it for each run; allowed: --lrs NAME=LR",
        ),
        (
            ("--optimizers", "adamw", "--lr-grid", "1,-3"),
            "lr-grid: got '1,-3'; allowed: comma-separated numbers > 0 such as 0.3,1,3",
        ),
        (
            ("--optimizers", "adamw", "--target-accuracy", "1.5"),
            "target-accuracy: got 1.5; allowed: a number in (0.0, 1.0]",
        ),
        (
            ("--optimizers", "adamw", "--lr-trials", "1"),
            "lr-trials: got 1; allowed: an integer >= 2",
        ),
        (("--optimizers", "adamw", "--workers", "0"), "workers: got 0; allowed: an integer >= 1"),
        (("--optimizers", "adamw", "--pruner", "medain"), "pruner: unknown value 'medain'"),
        (
            ("--optimizers", "adamw", "--lr-trials", "3", "--lr-grid", "1,3"),
            "lr-grid: got '1,3' with --lr-trials 3; allowed: one of the two",
        ),
        (("--optimizers", "adamw", "--storage", "nowhere"), "storage: got 'nowhere'; allowed: "),
        (
            ("--optimizers", "adamw", "--storage", "mongodb://u:pw@h/db"),
            "storage: got 'mongodb://u:***@h/db', which no installed database driver takes",
        ),
        (("--join",), "join: got --recipe; a worker that joins runs the study's own sweep"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(tiny, tmp_path, capsys, extra, message):
    out = str(tmp_path / "out")
    if extra[0] == "--join":
        args = ["--join", "--recipe", "bert_finetune", "--out", out]
    else:
        args = ["--recipe", "bert_finetune", "--out", out, *tiny_options(tiny), *extra]
    with pytest.raises(SystemExit) as stop:
        compare.main(args)
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"python -m recipes.compare: error: {message}")
    assert "pw@" not in line
    if "storage" not in message:
        assert not (tmp_path / "out").exists()


def test_unknown_recipe_and_optimizer_suggest_the_closest_name(capsys):
    for args, expected in (
        (["--recipe", "bert", "--optimizers", "adamw"], "did you mean 'bert_finetune'?"),
        (["--recipe", "bert_finetune", "--optimizers", "nesterow"], "did you mean 'nesterov'?"),
    ):
        with pytest.raises(SystemExit):
            compare.main(args)
        assert capsys.readouterr().err.strip().endswith(expected)


def test_an_unreachable_database_is_one_line_naming_the_url_without_its_password(
    tiny, tmp_path, capsys
):
    url = f"postgresql://sweep:{PASSWORD}@127.0.0.1:{free_port()}/sweeps"
    args = command_args(DOC_POSTGRES, tmp_path / "out", url, tiny)
    with pytest.raises(SystemExit) as stop:
        compare.main(args)
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    shown = masked_url(storage_url(url, tmp_path))
    assert line.startswith(f"python -m recipes.compare: error: storage: cannot use {shown}: ")
    assert "sweep:***@127.0.0.1" in line and PASSWORD not in line
    assert "Connection refused" in line or "connection failed" in line


def test_a_folder_holding_another_sweep_is_refused(sweep, tiny, capsys):
    with pytest.raises(SystemExit) as stop:
        compare.main([*sweep["args"], "--data.max_length", "32"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "study: 'adamw_sgd' holds a sweep of bert_finetune with the options" in err
    assert err.endswith("allowed: the same recipe and options, or another --out or --study")


def test_a_usage_error_in_a_run_stops_the_sweep_with_the_recipes_message(tiny, tmp_path, capsys):
    args = command_args(DOC_SWEEP, tmp_path / "out", tiny=tiny)
    with pytest.raises(SystemExit) as stop:
        run_compare([*args, "--data.text_column", "body"])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m recipes.compare: error: text_column: ")
    assert "'body'" in line
    trials = study_of(tmp_path / "out").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING", "WAITING", "WAITING"]


@pytest.mark.ddp
def test_a_sweep_of_ddp_runs_records_rank_zero_once(tiny, tmp_path, wandb_run):
    out = tmp_path / "ddp"
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4")
    args = ["--recipe", "bert_finetune", "--optimizers", "adamw", "--lrs", "adamw=3e-3"]
    run_compare([*args, "--out", str(out), *tiny_options(tiny), *ddp])
    run_dir = out / "runs" / "adamw-lr0.003-seed42"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 4
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (run_dir / "output.log").read_text()
    records = wandb_run.records(run_dir)  # exactly one W&B run: rank zero's
    (row,) = json.loads((out / "results.json").read_text())["runs"]
    assert row["final_val_acc"] == pytest.approx(logged(records, "val_acc")[-1][1], abs=1e-7)


# --- presets and the page of commands ------------------------------------------------------------
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

    assert set(LR_SCALE) == set(OPTIMIZERS.names())
    assert LR_SCALE["lion"] < LR_SCALE["adamw"]
    args = run_args(["--scheduler", "cosine"], "schedule_free_adamw", 3e-3, 0)
    assert args[args.index("--optimizer") :] == [
        "--optimizer", "schedule_free_adamw", "--lr", "0.003",
        "--scheduler", "constant", "--seed_everything", "0",
    ]  # fmt: skip
    assert "constant" not in run_args([], "adamw", 3e-3, 0)


def _bash_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith(("#", "export ")):
                commands.append(" ".join(line.split()))
    return commands


def test_every_command_of_the_sweep_page_is_one_these_tests_run():
    text = DOCS.read_text()
    assert sorted(_bash_commands(text)) == sorted(DOC_COMMANDS)
    assert "1 worker x 2 threads" in text and "2 workers x 1 thread" in text


def test_every_sweep_command_of_the_readme_is_one_these_tests_run():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Sweeps and the survey's claims", 1)[1].split("\n## ", 1)[0]
    commands = _bash_commands(section)
    assert len(commands) == 4
    assert set(commands) <= set(DOC_COMMANDS), set(commands) - set(DOC_COMMANDS)


# --- helpers -----------------------------------------------------------------------------------
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


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else None]


def _get_json(url: str, wait: float = 0) -> Any:
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_for_study(
    name: str, storage: str | None, process: subprocess.Popen, folder: Path | None = None
) -> optuna.Study:
    """The study once its creator, ``process``, has queued the plan; fails at once where the
    process has ended."""
    url = storage_url(storage, folder or Path("."))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended (status {process.returncode}) first")
        if storage is not None or (folder / "study.db").is_file():
            with contextlib.suppress(KeyError, Exception):
                study = optuna.load_study(study_name=name, storage=open_storage(url))
                if study.user_attrs.get("planned"):
                    return study
        time.sleep(0.5)
    raise AssertionError(f"no study {name} after 300 s")


def _mid_run_step(out: Path, trial: Any) -> int | None:
    """The step of ``trial``'s last.ckpt where it was written mid-run (before step 6 of 6)
    and the run has not finished; else ``None``."""
    run_dir = out / "runs" / trial.user_attrs.get("key", "")
    last = list(run_dir.glob("**/checkpoints/last.ckpt"))
    if not last or (run_dir / "result.json").exists():
        return None
    try:
        step = torch.load(last[0], map_location="cpu", weights_only=True)["global_step"]
    except Exception:  # being written
        return None
    return step if 2 <= step < 6 else None  # every 2 steps and at validations


def _running_with_checkpoint(
    study: optuna.Study,
    out: Path,
    pid: int,
    timeout: float,
    count: int = 1,
    process: subprocess.Popen | None = None,
) -> Any:
    """The running trial(s) of worker process ``pid`` once each has written a mid-run
    last.ckpt and not finished; fails at once where ``process`` (the worker) has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"worker {pid} ended (status {process.returncode}) first")
        ready = [
            trial
            for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            if f":{pid}/" in trial.user_attrs.get("worker", "")
            and "pid" in trial.user_attrs
            and _mid_run_step(out, trial) is not None
        ]
        if len(ready) >= count:
            return ready[0] if count == 1 else ready
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} ran no trial with a checkpoint within {timeout} s")


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False
