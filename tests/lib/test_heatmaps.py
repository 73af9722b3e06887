"""Layers x steps heatmaps of MomentStatistics: the history they are drawn from, the pictures,
where they go (PNG files, W&B images read back from an offline run, TensorBoard images) and
their events; real Trainer fits of the tiny MLP."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from optim_callbacks import (
    GradientClipping,
    MomentHistory,
    MomentStatistics,
    SpikeSkip,
    run_folder,
)
from optim_callbacks.callbacks.spike_skip import describe_event
from optim_callbacks.heatmaps import render_heatmap, short_layer_names, uses_log_scale
from tests.lib.test_clipping import BrokenRegressor
from tests.lib.test_moment_stats import SwitchToMomentum
from tests.lib.tiny import tiny_trainer

LAYERS = ["net.0", "net.1", "net.3"]


def test_history_records_rows_drops_relogged_steps_and_survives_a_checkpoint(tmp_path):
    history = MomentHistory(LAYERS)
    for step in (1, 3, 5):
        history.record(step, {"net.0": {"grad_norm": step}, "net.3": {"grad_norm": 2 * step}})
    history.record(3, {"net.1": {"update_to_weight": 0.5}})  # resumed from step 2: 3, 5 again
    assert history.steps == [1, 3]
    grad = history.matrix("grad_norm")
    assert (grad.shape == (3, 2) and grad[0].tolist() == [1.0, math.nan]) or grad[0, 0] == 1.0
    assert math.isnan(grad[1, 0]) and math.isnan(grad[0, 1]) and grad[2, 0] == 2.0
    assert math.isnan(history.matrix("update_to_weight")[1, 0])  # first seen at step 3
    assert history.matrix("update_to_weight")[1, 1] == 0.5
    history.add_event(2, "switch", "Adam → SGD")
    history.add_event(2, "switch", "Adam → SGD")  # once
    with pytest.raises(
        ValueError, match="kind: got 'crash'; allowed: switch, nonfinite, clipping, spike"
    ):
        history.add_event(2, "crash", "?")

    torch.save(history.state_dict(), tmp_path / "state.pt")
    loaded = MomentHistory()
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = MomentHistory.from_json(loaded.to_json())
    for copy in (loaded, again):
        assert copy.steps == [1, 3] and copy.layers == LAYERS and len(copy.events) == 1
        assert torch.equal(copy.matrix("grad_norm").nan_to_num(-1), grad.nan_to_num(-1))


def test_colour_scale_and_layer_names():
    assert uses_log_scale(torch.tensor([1e-5, 1e-3, math.nan]))
    assert not uses_log_scale(torch.tensor([0.0, 1e-3]))  # a zero has no log
    assert not uses_log_scale(torch.tensor([0.2, 0.9]))  # less than two decades
    assert not uses_log_scale(torch.tensor([-0.5, 0.5]))  # a cosine
    names = ["network.bert.embeddings", "network.bert.encoder.layer.0.output", "network.classifier"]
    assert short_layer_names(names) == [
        "bert.embeddings",
        "bert.encoder.layer.0.output",
        "classifier",
    ]


def test_a_heatmap_is_one_picture_of_fixed_size_and_events_are_drawn_on_it(tmp_path):
    history = MomentHistory([f"layer.{i}" for i in range(12)])
    generator = torch.Generator().manual_seed(0)
    for step in range(9, 200, 10):
        values = (10 ** (-4 * torch.rand(12, generator=generator))).tolist()
        history.record(step, {f"layer.{i}": {"update_to_weight": v} for i, v in enumerate(values)})
    plain = Image.open(render_heatmap(history, "update_to_weight", tmp_path / "plain.png"))
    history.add_event(99, "switch", "AdamW → SGD")
    history.add_event(129, "nonfinite", "1 non-finite step(s) skipped")
    history.add_event(59, "clipping", "9 of 10 steps clipped")
    marked = Image.open(render_heatmap(history, "update_to_weight", tmp_path / "marked.png"))
    assert plain.size == marked.size == (900, 392)  # 9 in wide, 2 + 0.16 per layer high, 100 dpi
    colours = len(set(plain.convert("RGB").getdata()))
    assert colours > 200  # a viridis picture, not a blank one
    difference = sum(a != b for a, b in zip(plain.getdata(), marked.getdata(), strict=True))
    assert difference > 1000  # the line, the markers and their legend


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """8 steps of Adam, a switch to SGD after step 3, a NaN loss at step 5, clipping at a tiny
    norm; MomentStatistics every 2 steps, headline images every 4, to W&B and TensorBoard."""
    folder = tmp_path_factory.mktemp("heatmaps")
    loggers = [
        TensorBoardLogger(str(folder), name="tb"),
        WandbLogger(project="heatmaps", save_dir=str(folder), offline=True),
    ]
    moments = MomentStatistics(every_n_steps=2, heatmap_every_n_steps=4)
    callbacks = [GradientClipping(max_norm=1e-3), moments, SwitchToMomentum()]
    trainer = tiny_trainer(folder, max_steps=8, logger=loggers, callbacks=callbacks)
    trainer.fit(BrokenRegressor(nonfinite_steps=(5,)))
    run_dir = loggers[1].experiment.dir
    loggers[1].experiment.finish()
    return {"folder": folder, "trainer": trainer, "moments": moments, "wandb": run_dir}


def test_pngs_go_to_the_run_folder_with_the_history_and_every_event(fitted):
    moments, trainer = fitted["moments"], fitted["trainer"]
    folder = run_folder(trainer) / "heatmaps"
    assert moments.heatmap_folder(trainer) == folder
    statistics = set(moments.history.statistics)
    assert {"update_to_weight", "step_size_p50", "second_moment_underflow"} <= statistics
    assert {p.stem for p in folder.glob("*.png")} == statistics
    for path in folder.glob("*.png"):
        assert Image.open(path).size[0] == 900
    assert moments.history.steps == [1, 3, 5, 7] and moments.history.layers == LAYERS
    events = {(e.step, e.kind) for e in moments.history.events}
    assert (3, "switch") in events  # global_step 3 when SwitchToMomentum replaced Adam
    assert (5, "nonfinite") in events  # the NaN of step 5, seen at the logging step 5
    assert {(1, "clipping"), (3, "clipping"), (7, "clipping")} <= events
    label = next(e.label for e in moments.history.events if e.kind == "switch")
    assert label == "Adam → SGD"
    assert (folder / "history.json").is_file()


def test_wandb_gets_images_and_a_summary_without_bins_or_layers(fitted, wandb_run):
    run = fitted["wandb"]
    rows = wandb_run.history(Path(run).parent)
    with_images = [r for r in rows if "heatmaps/update_to_weight._type" in r]
    assert [r["trainer/global_step"] for r in with_images] == [3, 7]  # every 4 steps (and the end)
    last = with_images[-1]
    assert last["heatmaps/update_to_weight._type"] == "image-file"
    assert last["heatmaps/update_to_weight.width"] == 900
    (at_end,) = [r for r in rows if "heatmaps/grad_cosine._type" in r]  # not a headline one
    assert at_end["trainer/global_step"] == 7
    keys = wandb_run.metric_keys(rows)
    assert "moments.update_to_weight/net.0" in keys  # per-layer scalars logged (default on)
    summary = wandb_run.summary(Path(run).parent)
    assert "moments/update_to_weight" in summary and "moments/grad_norm" in summary
    assert not [k for k in summary if k.startswith(("moments.", "heatmaps/"))]
    assert not [k for k in summary if "log10_step_size" in k]  # no histogram bins


def test_tensorboard_gets_grouped_scalar_tags_and_images(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = (fitted["folder"] / "tb").glob("version_*")
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"moments/update_to_weight", "moments.update_to_weight/net.0"} <= set(tags["scalars"])
    assert "heatmaps/update_to_weight" in tags["images"]
    steps = [e.step for e in events.Images("heatmaps/update_to_weight")]
    assert steps == [3, 7]
    assert [e.step for e in events.Images("heatmaps/grad_cosine")] == [7]


def test_per_layer_scalars_off_logs_global_keys_only_and_still_draws_every_layer(tmp_path):
    from tests.lib.tiny import RecordingLogger

    logger = RecordingLogger()
    moments = MomentStatistics(every_n_steps=2, per_layer_scalars=False, heatmap_dir=str(tmp_path))
    trainer = tiny_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[moments])
    trainer.fit(BrokenRegressor())
    keys = {k for _, metrics in logger.rows for k in metrics if k.startswith("moments")}
    assert keys and all(k.startswith("moments/") for k in keys)
    assert moments.history.matrix("update_to_weight").shape == (3, 2)
    assert (tmp_path / "update_to_weight.png").is_file()


def test_a_resumed_run_draws_the_whole_runs_heatmaps(tmp_path):
    def fit(folder, ckpt_path=None):
        moments = MomentStatistics(every_n_steps=2, heatmap_dir=str(folder / "heatmaps"))
        checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=4, save_top_k=-1)
        trainer = tiny_trainer(
            folder,
            max_steps=8,
            max_epochs=-1,
            logger=TensorBoardLogger(str(folder)),
            enable_checkpointing=True,
            callbacks=[GradientClipping(max_norm=1e-3), moments, checkpoint],
        )
        # 4 batches an epoch: the step-4 checkpoint is at an epoch's end, where a plain
        # DataLoader resumes exactly
        trainer.fit(BrokenRegressor(scheduler=None, samples=64), ckpt_path=ckpt_path)
        return moments.history

    full = fit(tmp_path / "full")
    (at_four,) = (tmp_path / "full" / "ckpt").glob("*step=4.ckpt")
    resumed = fit(tmp_path / "resumed", ckpt_path=str(at_four))
    assert resumed.steps == full.steps == [1, 3, 5, 7]
    assert resumed.events == full.events
    for stat in full.statistics:
        assert torch.allclose(resumed.matrix(stat), full.matrix(stat), equal_nan=True)


SPIKE_PURPLE = (148, 103, 189)  # the "spike" marker's colour, #9467bd


def test_a_skipped_spike_is_an_event_on_the_heatmaps(tmp_path):
    """A real fit with a x100 loss batch at step 20: SpikeSkip tells MomentStatistics through
    the ``on_spike_skipped`` hook (no class check), which marks step 20 (not a logging step)
    with SpikeSkip's one-line description; the picture has the spike markers, the same picture
    without that event has none of their colour."""
    from tests.lib.test_spike_skip import (
        LOSS_SPIKE,
        SMALL,
        SpikyModule,
        bad_batch,
        clean_batches,
        with_batch,
    )

    moments = MomentStatistics(every_n_steps=4, heatmap_dir=str(tmp_path / "heatmaps"))
    skip = SpikeSkip(**SMALL)
    data = with_batch(clean_batches(27), 20, bad_batch(LOSS_SPIKE))
    from tests.lib.tiny import RecordingLogger

    trainer = tiny_trainer(tmp_path, logger=RecordingLogger(), callbacks=[skip, moments])
    trainer.fit(SpikyModule(data))
    assert [e["step"] for e in skip.events] == [20]
    spikes = [e for e in moments.history.events if e.kind == "spike"]
    assert [(e.step, e.label) for e in spikes] == [(20, describe_event(skip.events[0]))]
    assert 20 not in moments.history.steps  # marked where it happened, between logging steps

    marked = Image.open(render_heatmap(moments.history, "update_to_weight", tmp_path / "m.png"))
    moments.history.events = [e for e in moments.history.events if e.kind != "spike"]
    plain = Image.open(render_heatmap(moments.history, "update_to_weight", tmp_path / "p.png"))

    def purple(image: Image.Image) -> int:
        return sum(
            all(abs(a - b) <= 12 for a, b in zip(pixel, SPIKE_PURPLE, strict=True))
            for pixel in image.convert("RGB").getdata()
        )

    assert purple(plain) == 0
    assert purple(marked) >= 20  # the marker above the top row and the legend's


def test_without_matplotlib_one_warning_says_what_to_install_and_scalars_still_log(
    tmp_path, monkeypatch
):
    from tests.lib.tiny import RecordingLogger

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like
    logger = RecordingLogger()
    moments = MomentStatistics(every_n_steps=2, heatmap_dir=str(tmp_path / "heatmaps"))
    trainer = tiny_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[moments])
    with pytest.warns(UserWarning, match=r"heatmaps need matplotlib.*optim-callbacks\[plots\]"):
        trainer.fit(BrokenRegressor())
    assert any("moments/update_to_weight" in metrics for _, metrics in logger.rows)
    assert not (tmp_path / "heatmaps").exists()
