"""The ViT and ResNet recipes end to end: real Trainer runs of tiny models on a few hundred real
Fashion-MNIST images, W&B offline runs read back, checkpoint folders fine-tuned with another
label count, reduced precision, exact resume, two-process DDP, usage errors, YAML presets.

The two tests that check what the presets learn need Debian's Fashion-MNIST (``make test``
installs it where it can; elsewhere they are skipped with one line saying how to get it); the
others run on synthetic images of the same layout where it is missing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from recipes.resnet_finetune import run as run_resnet
from recipes.vit_finetune import run as run_vit
from tests.recipes.test_images import (
    fashion_mnist,
    fashion_mnist_or_stand_in,
    write_idx,
    write_image_folder,
)
from tests.recipes.tiny_text import assert_adam_state_follows_precision

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = {"vit": run_vit, "resnet": run_resnet}
TINY = {
    "vit": {
        "patch_size": 7,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "initializer_range": 0.1,  # a wider init than ViT-Base's 0.02 learns faster when tiny
    },
    "resnet": {"embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1]},
}


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    """The first 600 training and 200 test images of Fashion-MNIST (real where installed) as
    idx files."""
    full = fashion_mnist_or_stand_in()
    root = tmp_path_factory.mktemp("fashion")
    for name, split, n in (("train", full.train, 600), ("t10k", full.test, 200)):
        write_idx(root / f"{name}-images-idx3-ubyte", split.images[:n, 0].numpy(), compress=True)
        write_idx(root / f"{name}-labels-idx1-ubyte", split.labels[:n].numpy(), compress=False)
    return root


def tiny_args(family: str, root: Path, *extra: str) -> list[str]:
    """A quiet, quick run of the tiny ``family`` model on the small Fashion-MNIST folder."""
    return [
        *("--data.root", str(root), "--data.val_size", "100", "--data.batch_size", "32"),
        *("--model.config", json.dumps(TINY[family]), "--trainer.accelerator", "cpu"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *("--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "2"),
        *("--moment_stats.every_n_steps", "4"),
        *extra,
    ]


def group_of(cli: Any) -> dict[str, dict[str, Any]]:
    """Parameter name -> its optimizer group."""
    names = {id(p): n for n, p in cli.model.named_parameters()}
    return {
        names[id(p)]: group
        for group in cli.trainer.optimizers[0].param_groups
        for p in group["params"]
    }


def test_resnet_preset_learns_and_logs_to_wandb_offline(fashion_root, tmp_path, wandb_run):
    fashion_mnist()  # the accuracy bound is for the real images: fails without them where make test installs them
    runs = str(tmp_path / "runs")
    args = ["--trainer.max_epochs", "3", "--lr", "0.8"]
    cli = run_resnet(tiny_args("resnet", fashion_root, *args, "--trainer.default_root_dir", runs))
    results = cli.test_results
    assert results["test_acc"] >= 0.6  # 10 classes: chance is 0.1

    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    groups = group_of(cli)
    conv = groups["network.resnet.embedder.embedder.convolution.weight"]
    assert conv["nesterov"] is True and conv["momentum"] == 0.9
    assert conv["initial_lr"] == pytest.approx(0.8 * 32 / 256)  # linear scaling to batch 32
    assert conv["weight_decay"] == 5e-4
    for name in (
        "network.resnet.embedder.embedder.normalization.weight",
        "network.classifier.1.bias",
    ):
        assert groups[name]["weight_decay"] == 0.0  # weights only: no decay on BatchNorm, biases
    assert conv["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at zero

    cli.trainer.logger.experiment.finish()
    summary = wandb_run.summary(tmp_path / "runs")
    assert summary["test_acc"] == pytest.approx(results["test_acc"])
    assert summary["trainer/global_step"] == cli.trainer.global_step == 3 * 16  # 500 images / 32
    assert {"val_acc", "train_loss", "lr/decay", "grad_clip/pre_clip_norm"} <= summary.keys()
    assert any(key.startswith("moments") for key in summary)


def test_vit_preset_with_layer_decay_learns(fashion_root, tmp_path, capsys):
    fashion_mnist()  # the accuracy bound is for the real images: fails without them where make test installs them
    runs = str(tmp_path / "runs")
    args = ["--trainer.max_epochs", "4", "--lr", "3e-3", "--model.optimization.layer_decay", "0.8"]
    args += ["--data.augment", "false", "--logger", "csv", "--trainer.default_root_dir", runs]
    cli = run_vit(tiny_args("vit", fashion_root, *args))
    assert cli.test_results["test_acc"] >= 0.45  # a 2-layer ViT, 64 steps; chance is 0.1
    groups = group_of(cli)
    head = groups["network.classifier.weight"]
    assert isinstance(cli.trainer.optimizers[0], torch.optim.AdamW)
    assert head["weight_decay"] == 0.05 and head["initial_lr"] == pytest.approx(3e-3)
    # 2 encoder layers: embeddings are layer 0, layer i gets lr * 0.8 ** (3 - i)
    first_layer = groups["network.vit.layers.0.mlp.fc1.weight"]["initial_lr"]
    assert first_layer == pytest.approx(3e-3 * 0.8**2)
    embedding = groups["network.vit.embeddings.patch_embeddings.projection.weight"]
    assert embedding["initial_lr"] == pytest.approx(3e-3 * 0.8**3)
    for name in ("network.vit.embeddings.cls_token", "network.vit.embeddings.position_embeddings"):
        assert groups[name]["weight_decay"] == 0.0
    out = capsys.readouterr().out
    assert "Test results (200 examples, best checkpoint)" in out
    metrics = Path(out.split("CSV metrics: ")[1].split()[0]).read_text()
    assert "grad_clip/pre_clip_norm" in metrics.splitlines()[0]  # clipping at 1.0 is on


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_a_saved_checkpoint_is_fine_tuned_with_another_label_count(fashion_root, tmp_path, family):
    from recipes.models.vision import build_image_classifier

    # A "pretrained" RGB model with 7 labels that expects its own size and normalization.
    size = 32 if family == "vit" else 224
    config = {**TINY[family], "num_channels": 3}
    if family == "vit":
        config["image_size"] = size
    saved = build_image_classifier(family, 7, config=config)
    saved.save_pretrained(tmp_path / "pretrained")
    processor = {"do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    processor["size"] = {"height": size, "width": size}
    (tmp_path / "pretrained" / "preprocessor_config.json").write_text(json.dumps(processor))

    if family == "vit":  # the user's own images: 3 classes of RGB PNGs
        data = ["--data.source", "image_folder"]
        data += ["--data.root", str(write_image_folder(tmp_path / "own", {"a": 8, "b": 8, "c": 8}))]
        data += ["--data.val_size", "4", "--data.batch_size", "4"]
    else:  # grey Fashion-MNIST, made RGB and 224 px for the checkpoint
        data = ["--data.root", str(fashion_root), "--data.batch_size", "8"]
    cli = RUNS[family](
        [
            *tiny_args(family, fashion_root, "--logger", "none", "--trainer.max_steps", "2"),
            *("--model.config", "null", "--model.checkpoint", str(tmp_path / "pretrained")),
            *data,
            *("--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"),
        ]
    )
    network = cli.model.network
    classes = cli.datamodule.class_names
    assert network.config.num_labels == len(classes) == (3 if family == "vit" else 10)
    assert network.config.id2label == dict(enumerate(classes))
    transform = cli.datamodule.transform
    assert (transform.num_channels, transform.image_size) == (3, size)
    assert transform.mean == (0.5, 0.4, 0.3) and transform.std == (0.2, 0.25, 0.3)
    batch = next(iter(cli.datamodule.test_dataloader()))
    pixels = cli.datamodule.on_after_batch_transfer(batch, 0)["pixel_values"]
    assert tuple(pixels.shape[1:]) == (3, size, size)
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize(
    ("family", "precision"),
    [("resnet", "bf16-mixed"), ("resnet", "16-true"), ("vit", "bf16-mixed"), ("vit", "16-true")],
)
def test_recipes_train_in_reduced_precision(fashion_root, family, precision):
    cli = RUNS[family](
        tiny_args(
            family,
            fashion_root,
            *("--trainer.precision", precision, "--trainer.max_steps", "3", "--logger", "none"),
            *("--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"),
        )
    )
    assert torch.isfinite(torch.tensor(cli.test_results["test_loss"]))
    optimizer = cli.trainer.optimizers[0]
    if family == "vit":
        assert_adam_state_follows_precision(optimizer, precision)
    else:  # mixed precision keeps float32 weights and momentum; 16-true makes both float16
        buffer = next(iter(optimizer.state.values()))["momentum_buffer"]
        assert buffer.dtype == (torch.float16 if precision == "16-true" else torch.float32)


def _checkpoint_tensors(path: Path) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    tensors = {f"model.{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, state in enumerate(checkpoint["optimizer_states"][0]["state"].values()):
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items()})
    tensors["data"] = checkpoint["ImageClassificationData"]
    return tensors


@pytest.mark.parametrize("interruption", ["epoch_checkpoint", "killed_mid_epoch"])
def test_resuming_continues_exactly(fashion_root, tmp_path, killed_run, interruption):
    # Augmentation, shuffling, BatchNorm statistics, momentum and the schedule all have to
    # line up for the resumed run to end bit for bit where the uninterrupted one ended.
    common = tiny_args("resnet", fashion_root, "--logger", "none", "--trainer.max_epochs", "2")
    common += ["--trainer.limit_test_batches", "1", "--data.max_train_images", "256"]
    common += ["--checkpoint.save_top_k", "-1"]  # keep every epoch's checkpoint
    common += ["--data.crop_padding", "4"]  # random crops and flips
    common += ["--last_checkpoint.every_n_train_steps", "2"]
    straight = run_resnet([*common, "--trainer.default_root_dir", str(tmp_path / "straight")])
    folder = Path(straight.trainer.checkpoint_callback.dirpath)
    if interruption == "epoch_checkpoint":
        (start,) = folder.glob("epoch0-*.ckpt")
        root = tmp_path / "resumed"
        batches_seen = 8
    else:  # SIGKILL after step 11 of 16 (8 per epoch): last.ckpt is step 10's
        root = tmp_path / "killed"
        killed_run(
            "recipes.resnet_finetune",
            [*common, "--trainer.default_root_dir", str(root)],
            tmp_path,
            11,
        )
        (start,) = root.glob("**/last.ckpt")
        batches_seen = 10
    assert _checkpoint_tensors(start)["data"]["train_batches_seen"] == batches_seen
    resumed = run_resnet(
        [*common, "--trainer.default_root_dir", str(root), "--ckpt_path", str(start)]
    )
    assert resumed.trainer.global_step == straight.trainer.global_step == 2 * 8
    expected = _checkpoint_tensors(folder / "last.ckpt")
    actual = _checkpoint_tensors(Path(resumed.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    assert expected["data"]["train_batches_seen"] == actual["data"]["train_batches_seen"] == 16
    assert expected.keys() == actual.keys()
    assert [k for k in expected if k != "data" and not torch.equal(expected[k], actual[k])] == []
    assert resumed.test_results == straight.test_results


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        (
            "resnet",
            ["--optimizer", "nesterv"],
            "--optimizer: unknown value 'nesterv'; allowed: .*; did you mean 'nesterov'?",
        ),
        ("vit", ["--data.root", "{tmp}"], "data.root: Fashion-MNIST not found in '{tmp}'.*apt-get"),
        ("vit", ["--model.checkpoint", "{tmp}"], "model.checkpoint: '{tmp}' .folder. is not a"),
        ("resnet", ["--model.config", '{"depth": [1]}'], "unknown option 'depth'.*'depths'"),
        ("resnet", ["--model.lr_scaling", "square"], "lr_scaling"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    fashion_root, tmp_path, capsys, family, args, message
):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        RUNS[family](tiny_args(family, fashion_root, "--logger", "none", *args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    assert re.search(message.replace("{tmp}", re.escape(str(tmp_path))), "\n".join(err[-3:]))


def _printed_config(run: Any, args: list[str], capsys: Any) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        run([*args, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    config.pop("config", None)
    return config


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_yaml_config_spells_out_the_default_preset(family, capsys):
    run = RUNS[family]
    path = REPO_ROOT / "configs" / f"{family}_finetune.yaml"
    defaults = _printed_config(run, [], capsys)
    from_yaml = _printed_config(run, ["--config", str(path)], capsys)
    assert from_yaml == defaults
    written = yaml.safe_load(path.read_text())
    preset = {
        "vit": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "scheduler": "cosine"},
        "resnet": {"optimizer": "nesterov", "lr": 0.1, "weight_decay": 5e-4, "scheduler": "cosine"},
    }[family]
    assert {key: written[key] for key in preset} == preset


@pytest.mark.ddp
def test_two_process_ddp_scales_lr_and_keeps_ranks_in_step(fashion_root, tmp_path, two_processes):
    args = tiny_args("resnet", fashion_root, "--logger", "csv", "--trainer.max_epochs", "2")
    args += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    args += ["--data.max_train_images", "256", "--trainer.default_root_dir", str(tmp_path / "runs")]
    args += ["--trainer.callbacks+", "tests.scripts.ddp_vision.TrainIndexRecorder"]
    ranks = two_processes("ddp_vision.py", tmp_path, *args)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    # 256 images on 2 ranks at 32 per batch: 4 steps per epoch on each rank
    assert {r["global_step"] for r in ranks} == {8}
    assert [r["initial_lr"] for r in ranks] == pytest.approx([0.1 * 64 / 256] * 2)  # batch 2 x 32
    assert ranks[0]["parameter_sum"] == ranks[1]["parameter_sum"]
    assert ranks[0]["test"] == ranks[1]["test"]  # metrics are synchronized
    # Lightning kept the recipe's sampler (a DistributedSampler, so resumable): each epoch, the
    # ranks drew disjoint halves of the 256 training images, and a new order in the second epoch
    assert {r["sampler"] for r in ranks} == {"EpochSeededSampler"}
    for epoch in (0, 1):
        halves = [set(r["train_indices"][epoch * 128 : (epoch + 1) * 128]) for r in ranks]
        assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 256
    assert ranks[0]["train_indices"][:128] != ranks[0]["train_indices"][128:]
