"""The BERT recipe end to end, in process: real Trainer runs of a tiny random BERT (MiniLM
tokenizer) on a small CSV, one smoke run of the real embedded MiniLM on BBC News."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from recipes.bert_finetune import run
from tests.recipes.tiny_text import assert_adam_state_follows_precision, tiny_args


def test_tiny_bert_learns_the_keyword_classes_and_reports_every_metric(tiny, tmp_path, capsys):
    model_dir, data = tiny
    cli = run(tiny_args(model_dir, data, "--trainer.max_epochs", "3", "--logger", "csv"))
    results = cli.test_results
    assert results["test_acc"] >= 0.9  # 3 balanced classes: chance is 0.33
    assert 0.0 < results["test_f1"] <= 1.0 and results["test_loss"] < 1.0

    out = capsys.readouterr().out
    assert "Test results (12 examples, best checkpoint)" in out
    assert f"accuracy {results['test_acc']:>10.4f}" in out
    assert f"macro F1 {results['test_f1']:>10.4f}" in out
    metrics_file = Path(out.split("CSV metrics: ")[1].split()[0])
    rows = list(csv.DictReader(metrics_file.open()))
    logged = set().union(*(k for row in rows for k in [{c for c, v in row.items() if v}]))
    assert {
        "train_loss",
        "val_acc",
        "val_f1",
        "val_loss",
        "lr/decay",
        "lr/no_decay",
        "test_acc",
    } <= logged
    assert any(key.startswith("grad_clip/") for key in logged)  # GradientClipping is on
    assert (metrics_file.parent / "config.yaml").is_file()

    optimizer = cli.trainer.optimizers[0]
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in cli.model.named_parameters()}
    no_decay = [names[id(p)] for p in groups["no_decay"]["params"]]
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)


def test_fsdp2_shards_each_bert_encoder_layer(tiny):
    from recipes.bert_finetune import BertClassifier

    model_dir, _ = tiny
    blocks = BertClassifier(str(model_dir), num_classes=3).sharded_blocks()
    assert [type(block).__name__ for block in blocks] == ["BertLayer", "BertLayer"]


def test_layer_decay_scales_lower_layers_down(tiny):
    model_dir, data = tiny
    cli = run(
        tiny_args(
            model_dir,
            data,
            "--trainer.max_steps",
            "1",
            "--logger",
            "none",
            "--model.optimization.layer_decay",
            "0.5",
        )
    )
    lr_of = {group["name"]: group["initial_lr"] for group in cli.trainer.optimizers[0].param_groups}
    # 2 encoder layers: embeddings are layer 0, the head layer 3 (lr * 0.5 ** (3 - i))
    assert lr_of["layer_03.decay"] / lr_of["layer_01.decay"] == pytest.approx(4.0)
    assert lr_of["layer_00.no_decay"] / lr_of["layer_03.no_decay"] == pytest.approx(0.125)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-true"])  # CPU runs 16-mixed as bf16
def test_recipe_trains_in_reduced_precision(tiny, precision):
    model_dir, data = tiny
    cli = run(
        tiny_args(
            model_dir,
            data,
            *("--trainer.precision", precision, "--trainer.max_steps", "3", "--logger", "none"),
            *("--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"),
        )
    )
    assert torch.isfinite(torch.tensor(cli.test_results["test_loss"]))
    assert_adam_state_follows_precision(cli.trainer.optimizers[0], precision)


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    tensors = {f"model.{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, state in enumerate(checkpoint["optimizer_states"][0]["state"].values()):
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items()})
    assert checkpoint["global_step"] > 0
    return tensors


def test_resume_from_a_checkpoint_continues_exactly(tiny, tmp_path, capsys):
    model_dir, data = tiny
    common = tiny_args(model_dir, data, "--logger", "csv", "--trainer.max_epochs", "2")
    common += ["--trainer.limit_test_batches", "1", "--checkpoint.save_top_k", "-1"]  # every epoch
    straight = run([*common, "--trainer.default_root_dir", str(tmp_path / "straight")])
    folder = Path(straight.trainer.checkpoint_callback.dirpath)
    (after_first_epoch,) = folder.glob("epoch0-*.ckpt")
    resumed = run(
        [
            *common,
            "--trainer.default_root_dir",
            str(tmp_path / "resumed"),
            "--ckpt_path",
            str(after_first_epoch),
        ]
    )
    steps_per_epoch = 96 // 4  # 96 training examples (80% of 120), batch 4
    assert resumed.trainer.global_step == straight.trainer.global_step == 2 * steps_per_epoch
    expected = _checkpoint_tensors(folder / "last.ckpt")
    actual = _checkpoint_tensors(Path(resumed.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert different == []
    # limit_test_batches 1 at batch 4: the table counts the 4 examples tested, not all 12
    assert capsys.readouterr().out.count("Test results (4 examples, best checkpoint)") == 2


def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_exactly(
    tiny, tmp_path, killed_run
):
    """SIGKILL after step 5 of an epoch of 24 steps; last.ckpt rolls every 2 steps (step 4)."""
    model_dir, data = tiny
    common = tiny_args(model_dir, data, "--logger", "csv", "--trainer.max_epochs", "2")
    common += ["--trainer.limit_test_batches", "1", "--last_checkpoint.every_n_train_steps", "2"]
    straight = run([*common, "--trainer.default_root_dir", str(tmp_path / "straight")])

    killed_root = tmp_path / "killed"
    args = [*common, "--trainer.default_root_dir", str(killed_root)]
    killed_run("recipes.bert_finetune", args, tmp_path, after_step=5)
    (last,) = killed_root.glob("**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 4  # mid-epoch

    resumed = run(
        [*common, "--trainer.default_root_dir", str(killed_root), "--ckpt_path", str(last)]
    )
    assert resumed.trainer.global_step == straight.trainer.global_step == 2 * 24
    expected = _checkpoint_tensors(Path(straight.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    actual = _checkpoint_tensors(Path(resumed.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    assert resumed.test_results == straight.test_results


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_and_fsdp2_runs_killed_mid_epoch_resume_like_the_uninterrupted_ddp_run(
    tiny, tmp_path, killed_run, two_processes, wandb_run
):
    """Two gloo ranks, 12 steps per epoch, 2 epochs, last.ckpt every 2 steps; one
    uninterrupted DDP run is the oracle of both:

    - DDP, both ranks SIGKILLed after step 5 (last.ckpt from step 4, mid-epoch), resumed: each
      rank continues its share of the epoch where it stopped; weights bit for bit and the same
      test metrics;
    - ``--trainer.strategy fsdp2`` (each encoder layer and the root sharded), killed after step
      13 (last.ckpt, a distributed-checkpoint folder, from step 12), resumed, tested
      from its best checkpoint: the DDP run's weights (to float32 rounding) and test metrics,
      logged to W&B by rank zero."""
    model_dir, data = tiny
    common = tiny_args(model_dir, data, "--trainer.max_epochs", "2", "--trainer.devices", "2")
    common += ["--trainer.limit_test_batches", "2", "--last_checkpoint.every_n_train_steps", "2"]
    common += ["--trainer.default_root_dir", "runs"]
    ddp_args = [*common, "--trainer.strategy", "ddp", "--logger", "none"]
    folders = {name: tmp_path / name for name in ("ddp", "ddp_killed", "fsdp2_killed", "fsdp2")}
    for folder in folders.values():
        folder.mkdir()
    ddp = two_processes("ddp_bert.py", folders["ddp"], *ddp_args)
    (expected_path,) = folders["ddp"].glob("runs/**/checkpoints/last.ckpt")
    expected = _checkpoint_tensors(expected_path)

    # DDP: killed mid-epoch, resumed, bit for bit
    killed_run("recipes.bert_finetune", ddp_args, folders["ddp_killed"], after_step=5)
    (last,) = folders["ddp_killed"].glob("runs/**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 4  # mid-epoch
    ranks = two_processes("ddp_bert.py", folders["ddp_killed"], *ddp_args, "--ckpt_path", str(last))
    assert [r["global_step"] for r in ranks] == [2 * 12, 2 * 12]
    actual_path = max(
        folders["ddp_killed"].glob("runs/**/checkpoints/last.ckpt"),
        key=lambda path: torch.load(path, weights_only=True)["global_step"],
    )
    actual = _checkpoint_tensors(actual_path)
    assert expected.keys() == actual.keys()
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    assert [r["test"] for r in ranks] == [r["test"] for r in ddp]

    # FSDP2: killed, resumed from its sharded checkpoint, equal to DDP up to rounding
    fsdp2 = [*common, "--trainer.strategy", "fsdp2"]
    killed_run(
        "recipes.bert_finetune",
        [*fsdp2, "--logger", "none"],
        folders["fsdp2_killed"],
        after_step=13,
    )
    (last,) = folders["fsdp2_killed"].glob("runs/**/checkpoints/last.ckpt")
    assert (last / ".metadata").is_file()  # sharded: each rank wrote its shards
    resumed = folders["fsdp2"]
    ranks = two_processes(
        "ddp_bert.py", resumed, *fsdp2, "--ckpt_path", str(last), HOME=str(resumed)
    )
    assert [r["strategy"] for r in ranks] == ["FSDP2Strategy"] * 2
    assert [r["global_step"] for r in ranks] == [24, 24]
    assert ranks[0]["test"] == ranks[1]["test"] == ddp[0]["test"]
    difference = max(
        abs(a - b) for a, b in zip(ranks[0]["parameters"], ddp[0]["parameters"], strict=True)
    )
    assert difference <= 1e-5  # clipping's norm sums shards in another order: float32 rounding
    (best,) = resumed.glob("runs/**/checkpoints/epoch1-*.ckpt")
    assert (best / ".metadata").is_file()
    history = wandb_run.history(resumed / "runs")  # rank zero's offline run, read back
    steps = [row for row in history if "train_loss" in row]
    assert steps and all(math.isfinite(row["train_loss"]) for row in steps)
    assert wandb_run.summary(resumed / "runs")["test_acc"] == pytest.approx(
        ddp[0]["test"]["test_acc"]
    )


def test_ctrl_c_saves_a_checkpoint_the_run_resumes_from(tiny, tmp_path, killed_run):
    model_dir, data = tiny
    root = tmp_path / "interrupted"
    args = tiny_args(model_dir, data, "--logger", "csv", "--trainer.max_epochs", "1")
    args += ["--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(root)]
    killed_run("recipes.bert_finetune", args, tmp_path, after_step=3, signal_number=2)
    (saved,) = root.glob("**/checkpoints/interrupted-epoch0-step3.ckpt")
    (last,) = root.glob("**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = run([*args, "--ckpt_path", str(saved)])
    assert resumed.trainer.global_step == 24


def test_adam_to_sgd_switch_at_half_of_training_is_one_flag(tiny):
    model_dir, data = tiny
    cli = run(
        tiny_args(
            model_dir,
            data,
            *("--trainer.max_steps", "6", "--logger", "csv", "--trainer.limit_test_batches", "1"),
            *("--adam_to_sgd.at_fraction", "0.5"),
        )
    )
    assert isinstance(cli.trainer.optimizers[0], torch.optim.SGD)
    assert torch.isfinite(torch.tensor(cli.test_results["test_loss"]))


def test_a_schedule_free_optimizer_brings_its_train_eval_switching(tiny):
    """--optimizer schedule_free_adamw: the module adds ScheduleFreeModes, so the run ends in
    eval mode (tested and saved with the average weights)."""
    from optim_callbacks import ScheduleFreeModes

    model_dir, data = tiny
    cli = run(
        tiny_args(
            model_dir,
            data,
            *("--trainer.max_steps", "4", "--logger", "csv", "--trainer.limit_test_batches", "1"),
            *("--optimizer", "schedule_free_adamw", "--scheduler", "constant"),
        )
    )
    optimizer = cli.trainer.optimizers[0]
    assert any(isinstance(c, ScheduleFreeModes) for c in cli.trainer.callbacks)
    assert not optimizer.training and optimizer.param_groups[0]["k"] == 4
    assert torch.isfinite(torch.tensor(cli.test_results["test_loss"]))


def test_warmup_longer_than_the_run_is_a_usage_error(tiny, capsys):
    model_dir, data = tiny
    with pytest.raises(SystemExit) as exit_info:
        run(
            tiny_args(
                model_dir, data, "--trainer.max_steps", "4", "--logger", "none", "--warmup", "10"
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "python -m recipes.bert_finetune: error: warmup: got 10 (10 steps); allowed: fewer than total_steps (4)"
    )


@pytest.mark.slow
def test_embedded_minilm_fine_tunes_on_bbc_news_for_two_steps(tmp_path):
    cli = run(
        [
            *(
                "--trainer.max_steps",
                "2",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.limit_test_batches",
                "2",
            ),
            *("--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"),
            *("--logger", "none", "--trainer.accelerator", "cpu"),
        ]
    )
    network = cli.model.network
    assert network.config.num_hidden_layers == 6 and network.config.hidden_size == 384
    assert network.config.id2label == {
        0: "business",
        1: "entertainment",
        2: "politics",
        3: "sports",
        4: "tech",
    }
    assert cli.trainer.global_step == 2
    assert 0.0 <= cli.test_results["test_acc"] <= 1.0
    assert torch.isfinite(torch.tensor(cli.test_results["test_loss"]))
