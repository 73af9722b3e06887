"""The recipe CLI the way a user runs it: ``python -m recipes.bert_finetune ...`` as a
subprocess (offline W&B read back from disk, DDP with two gloo processes), plus usage errors
and the YAML config through the same ``run`` entry point in process."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from optim_callbacks import OPTIMIZERS, SCHEDULES
from recipes.bert_finetune import PRESET, RECIPE, run
from recipes.core.optimization import TOP_LEVEL_FLAGS
from tests.recipes.tiny_text import (
    PYTHON,
    REPO_ROOT,
    keyword_rows,
    subprocess_env,
    tiny_args,
    write_csv,
)

CONFIG = REPO_ROOT / "configs" / "bert_finetune.yaml"
OLD_CONFIG = Path(__file__).parent / "data" / "bert_config_v0_1.yaml"
PROG = "python -m recipes.bert_finetune"


def _usage_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_help_lists_the_registry_names_and_the_callback_switches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert f"one of: {', '.join(OPTIMIZERS.names())}" in text
    assert f"one of: {', '.join(SCHEDULES.names())}" in text
    for flag in (
        "--lr",
        "--warmup",
        "--weight_decay",
        "--trainer.precision",
        "--trainer.strategy",
        "--data.dataset",
    ):
        assert flag in text
    for switch in (
        "--clipping",
        "--amp_epsilon",
        "--moment_stats",
        "--adam_to_sgd",
        "--lr_monitor",
        "--checkpoint",
    ):
        assert switch in text
    assert "--config" in text and "--print_config" in text and "--ckpt_path" in text


def test_usage_error_is_one_line_on_stderr_and_exit_status_2(tmp_path):
    """The command as a user runs it (the in-process tests below cover the other messages)."""
    message = (
        f"--optimizer: unknown value 'adamx'; allowed: {', '.join(sorted(OPTIMIZERS.names()))}; "
        "did you mean 'adam'?"
    )
    result = subprocess.run(
        [PYTHON, "-m", "recipes.bert_finetune", "--optimizer", "adamx"],
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"{PROG}: error: {message}"]


def test_unknown_scheduler_names_the_closest(capsys):
    line = _usage_error(capsys, ["--scheduler", "cosin"])
    assert line.startswith(f"{PROG}: error: --scheduler: unknown value 'cosin'")
    assert line.endswith("did you mean 'cosine'?")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "missing_file",
            r"dataset: file '.*missing\.csv' does not exist; allowed: an existing \.csv/\.jsonl "
            "file or 'bbc_news'",
        ),
        (
            "missing_column",
            r"text_column: 'text' is not a column of body\.csv; allowed: body, label",
        ),
        ("empty", r"dataset: '.*empty\.jsonl' has no examples"),
        (
            "one_class",
            r"label: '.*one\.csv' has a single class \('sport'\); allowed: at least 2 classes",
        ),
        (
            "bad_model",
            r"model_name_or_path: folder '.*not-a-model' does not exist; allowed: a local",
        ),
    ],
)
def test_bad_data_or_model_is_one_clear_line(tiny, tmp_path, capsys, case, expected):
    model_dir, data = tiny
    files = {
        "missing_file": tmp_path / "missing.csv",
        "missing_column": write_csv(
            tmp_path / "body.csv", keyword_rows(2), header=("body", "label")
        ),
        "empty": tmp_path / "empty.jsonl",
        "one_class": write_csv(tmp_path / "one.csv", [("a goal", "sport"), ("a match", "sport")]),
        "bad_model": data,
    }
    (tmp_path / "empty.jsonl").write_text("\n")
    model = tmp_path / "not-a-model" if case == "bad_model" else model_dir
    line = _usage_error(capsys, tiny_args(model, files[case]))
    assert line.startswith(f"{PROG}: error: ")
    assert re.search(expected, line), line


def _printed_config(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run([*args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    printed.pop("config", None)  # the file's own path
    return printed


def test_config_file_is_the_default_run_spelled_out(capsys):
    defaults = _printed_config(capsys, [])
    assert _printed_config(capsys, ["--config", str(CONFIG)]) == defaults
    written = yaml.safe_load(CONFIG.read_text())
    preset = {flag: getattr(PRESET, flag) for flag in TOP_LEVEL_FLAGS}
    assert {flag: written[flag] for flag in TOP_LEVEL_FLAGS} == preset
    assert defaults["optimizer"] == "adamw" and defaults["scheduler"] == "cosine"
    assert defaults["data"]["max_length"] == 128 and defaults["data"]["batch_size"] == 16
    assert (
        defaults["trainer"]["max_epochs"] == 1
        and defaults["clipping"]["init_args"]["max_norm"] == 1.0
    )
    assert defaults["adam_to_sgd"] is None  # off unless asked for


def test_findings_and_spike_skip_are_on_by_default_and_false_or_null_turns_them_off(capsys):
    defaults = _printed_config(capsys, [])
    assert defaults["findings"]["class_path"] == "optim_callbacks.TrainingFindings"
    assert defaults["spike_skip"]["class_path"] == "optim_callbacks.SpikeSkip"
    for args in (
        ["--findings", "false", "--spike_skip", "false"],
        ["--findings=False", "--spike_skip=false"],
        ["--findings", "null", "--spike_skip", "null"],
    ):
        off = _printed_config(capsys, args)
        assert off["findings"] is None and off["spike_skip"] is None, args
        assert off["clipping"] == defaults["clipping"]  # the others stay as they were
    # "false" is read as "off" only right after a callback flag
    kept = _printed_config(capsys, ["--findings", "false", "--project", "false"])
    assert kept["findings"] is None and kept["project"] == "false"


def test_a_config_saved_by_version_0_1_still_loads(capsys):
    """Version 0.1 saved ``layer_decay`` and the option dicts directly under ``model:``."""
    old = yaml.safe_load(OLD_CONFIG.read_text())
    assert {"layer_decay", "optimizer_options", "scheduler_options"} <= old["model"].keys()
    defaults = _printed_config(capsys, [])
    loaded = _printed_config(capsys, ["--config", str(OLD_CONFIG)])
    assert loaded["model"]["optimization"] == {
        "layer_decay": None,
        "optimizer_options": None,
        "scheduler_options": None,
    }
    loaded["model"] = defaults["model"]
    # its moment statistics keep what it saved (every 50 steps); options it predates take the
    # recipe's defaults
    saved, current = loaded.pop("moment_stats"), defaults.pop("moment_stats")
    assert saved["init_args"] == {**current["init_args"], "every_n_steps": 50}
    assert loaded == defaults
    # and the old flag spelling of those options
    flagged = _printed_config(capsys, ["--model.layer_decay", "0.5"])
    assert flagged["model"]["optimization"]["layer_decay"] == 0.5


def test_the_recorder_class_path_of_old_sweep_configs_still_resolves():
    config = RECIPE.configuration(["--trainer.callbacks+=recipes.compare_recorder.RunRecorder"])
    (callback,) = config.trainer.callbacks
    assert callback.class_path == "recipes.compare_recorder.RunRecorder"
    from recipes.compare_recorder import RunRecorder as Old
    from recipes.sweep.recorder import RunRecorder

    assert Old is RunRecorder


def test_configuration_parses_and_checks_without_running(tiny):
    model_dir, data = tiny
    config = RECIPE.configuration(tiny_args(model_dir, data, "--optimizer", "sgd", "--lr", "0.2"))
    assert (config.optimizer, config.lr) == ("sgd", 0.2)
    assert config.model.optimization.optimizer == "sgd"  # the flags set the model's settings
    with pytest.raises(ValueError, match=r"optimizer: unknown value 'adamx'.*did you mean 'adam"):
        RECIPE.configuration(["--optimizer", "adamx"])


def test_cli_with_the_yaml_logs_offline_to_wandb_without_credentials(tiny, tmp_path, wandb_run):
    model_dir, data = tiny
    args = [PYTHON, "-m", "recipes.bert_finetune", "--config", str(CONFIG)]
    args += tiny_args(model_dir, data, "--trainer.max_epochs", "1")
    result = subprocess.run(
        args,
        cwd=tmp_path,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    accuracy = float(re.search(r"^accuracy\s+([0-9.]+)$", out, re.M).group(1))
    run_dir = Path(re.search(r"^W&B run \(offline\): (\S+)$", out, re.M).group(1))
    assert f"wandb leet {run_dir}" in out and f"wandb sync {run_dir}" in out
    best = Path(re.search(r"^Best checkpoint: (\S+)$", out, re.M).group(1))
    assert (tmp_path / best).is_file() and (tmp_path / best).parent.parent.joinpath(
        "config.yaml"
    ).is_file()

    record = wandb_run.summary_record(tmp_path / run_dir)
    assert record["state"] == "finished" and record["project"] == "bert_finetune"
    summary = record["summary"]
    assert round(summary["test_acc"], 4) == accuracy
    assert {
        "val_acc",
        "val_f1",
        "val_loss",
        "train_loss",
        "lr/decay",
        "grad_clip/pre_clip_norm",
    } <= summary.keys()
    assert record["config"]["optimization"]["optimizer"] == "adamw"
    assert record["config"]["class_names"] == [
        "business",
        "sport",
        "tech",
    ]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_on_two_cpu_processes_syncs_metrics_and_logs_from_rank_zero(
    tiny, tmp_path, two_processes
):
    model_dir, data = tiny
    args = tiny_args(model_dir, data, "--trainer.max_epochs", "1")
    args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--trainer.default_root_dir", str(tmp_path / "runs")]
    ranks = two_processes("ddp_bert.py", tmp_path, *args, timeout=400, HOME=str(tmp_path))
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    # each rank tested its own half of the 12 test examples, and both report the synced totals
    assert len(ranks[0]["test_indices"]) == len(ranks[1]["test_indices"]) == 6
    assert not set(ranks[0]["test_indices"]) & set(ranks[1]["test_indices"])
    assert ranks[0]["test"] == ranks[1]["test"]
    assert ranks[0]["parameter_sum"] == ranks[1]["parameter_sum"]  # DDP kept replicas equal
    assert [r["logger_is_wandb_run"] for r in ranks] == [True, False]
    assert len(list((tmp_path / "runs" / "wandb").glob("offline-run-*"))) == 1
    assert (tmp_path / "stdout.log").read_text().count("Test results (12 examples") == 1
