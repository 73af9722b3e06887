"""Every usage error of the recipes' CLI is one line on stderr, names the parameter and exits
with status 2, with no traceback: parse errors, callback options, the root folder, the data's
encoding, the model folder and ``--ckpt_path``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from recipes.bert_finetune import run
from recipes.data.text_sources import load_table
from recipes.resnet_finetune import run as run_resnet
from tests.recipes.tiny_text import keyword_rows, tiny_args, write_csv

PROG = "python -m recipes.bert_finetune"


def _one_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in captured.err + captured.out
    assert lines[0].startswith(f"{PROG}: error: ")
    return lines[0].removeprefix(f"{PROG}: error: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--lr=inf"], "--lr: got inf; allowed: a number, or null"),
        (["--lr", ".inf"], "--lr: got inf; allowed: a finite number > 0"),
        (["--lr", "-1e-4"], "--lr: got -0.0001; allowed: a finite number > 0"),
        (["--lr"], "--lr: expected one value (a negative number is written --lr=-1e-4)"),
        (["--trainer.precision", "17"], "--trainer.precision: got 17; allowed: 64, 32, 16, .*'bf16-mixed'.*, or null"),
        (["--data.batch_size", "x"], "--data.batch_size: got x; allowed: an integer"),
        (["--optimiser", "adamw"], "unrecognized arguments: --optimiser adamw (closest: --optimizer)"),
        (["--adam_to_sgd.to", "nesterov"], "--adam_to_sgd.to: unknown option of AdamToSGD; allowed: at_step, at_epoch, at_fraction, lr, nesterov, momentum, weight_decay, momentum_init, epsilon, min_steps; closest: --adam_to_sgd.nesterov"),
        (["--clipping.max_nrom", "1"], "--clipping.max_nrom: unknown option of GradientClipping; allowed: mode, max_norm, .*; closest: --clipping.max_norm"),
        (["--model.optimization.layer_decay", "2"], "--model.optimization.layer_decay: got 2.0; allowed: a number in (0.0, 1.0]"),
        (["--clipping.max_norm", "-1"], "--clipping.max_norm: got -1.0; allowed: a finite number > 0"),
        (["--adam_to_sgd.at_fraction", "2"], "--adam_to_sgd.at_fraction: got 2.0; allowed: a number in (0.0, 1.0)"),
        (["--moment_stats.every_n_steps", "0"], "--moment_stats.every_n_steps: got 0; allowed: an integer >= 1"),
        (["--checkpoint.mode", "maxx"], "--checkpoint: `mode` can be min, max but got maxx"),
        (["--trainer.gradient_clip_val", "1.0"], "--trainer.gradient_clip_val: got 1.0, but the clipping callback clips the same gradients; allowed: one of the two, .*--clipping null with --trainer.gradient_clip_val"),
    ],
)  # fmt: skip
def test_parse_and_option_errors_are_one_line(capsys, args, expected):
    line = _one_line(capsys, args)
    pattern = re.escape(expected).replace(r"\.\*", ".*")
    assert re.fullmatch(pattern, line), line


def test_a_file_as_root_folder_is_refused_before_anything_is_written(capsys, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    line = _one_line(capsys, ["--trainer.default_root_dir", str(blocker / "bert")])
    assert line == (
        f"--trainer.default_root_dir: got {str(blocker / 'bert')!r}, but {str(blocker)!r} is a "
        "file; allowed: a folder path (created if missing)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no W&B run anywhere here


def test_a_latin_1_csv_names_the_file_and_the_encoding_option(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    rows = [(f"café {text}", label) for text, label in keyword_rows(4)]
    data = write_csv(tmp_path / "news.csv", [])
    with data.open("w", encoding="latin-1") as handle:
        handle.write("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    line = _one_line(capsys, tiny_args(model_dir, data))
    assert line.startswith("encoding: news.csv is not utf-8 text (byte 0xe9 at position ")
    assert line.endswith(
        "allowed: a utf-8 file, or --data.encoding with the file's encoding (e.g. latin-1, cp1252)"
    )
    assert load_table(data, encoding="latin-1").texts[0].startswith("café ")  # the option works
    line = _one_line(capsys, tiny_args(model_dir, data, "--data.encoding", "latin-9x"))
    assert line.startswith("encoding: got 'latin-9x'; allowed: a Python codec name")


@pytest.mark.parametrize("contents", ["empty", "config_only"])
def test_a_folder_without_a_model_is_one_line(tiny, tmp_path, capsys, contents):
    model_dir, data = tiny
    folder = tmp_path / "model"
    folder.mkdir()
    if contents == "config_only":
        shutil.copy(model_dir / "config.json", folder / "config.json")
    line = _one_line(capsys, tiny_args(folder, data))
    assert line.startswith(f"model_name_or_path: could not load {str(folder)!r}: ")


@pytest.fixture(scope="module")
def bert_checkpoint(tiny, tmp_path_factory) -> Path:
    """The last.ckpt of a real two-step tiny-BERT run with AdamW."""
    model_dir, data = tiny
    root = tmp_path_factory.mktemp("checkpointed")
    args = ["--logger", "none", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    cli = run(tiny_args(model_dir, data, *args, "--trainer.default_root_dir", str(root)))
    return Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"


def _corrupt(kind: str, checkpoint: Path, folder: Path) -> Path:
    target = folder / f"{kind}.ckpt"
    if kind == "random_bytes":
        target.write_bytes(torch.Generator().manual_seed(0).seed().to_bytes(8, "little") * 512)
    elif kind == "truncated":
        target.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif kind == "folder":
        target.mkdir()
    return target


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "--ckpt_path: '{path}' does not exist; allowed: an existing .ckpt file"),
        ("folder", "--ckpt_path: '{path}' is a folder; allowed: an existing .ckpt file"),
        ("random_bytes", "--ckpt_path: '{path}' is not a checkpoint that can be read ("),
        ("truncated", "--ckpt_path: '{path}' is not a checkpoint that can be read ("),
    ],
)
def test_an_unreadable_checkpoint_is_one_line(
    tiny, bert_checkpoint, tmp_path, capsys, kind, expected
):
    path = _corrupt(kind, bert_checkpoint, tmp_path)
    model_dir, data = tiny
    line = _one_line(
        capsys, tiny_args(model_dir, data, "--logger", "none", "--ckpt_path", str(path))
    )
    assert line.startswith(expected.format(path=path)), line
    assert "weights_only" not in line


def test_a_checkpoint_of_another_recipe_is_one_line_before_anything_is_built(
    bert_checkpoint, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        run_resnet(["--logger", "none", "--ckpt_path", str(bert_checkpoint)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m recipes.resnet_finetune: error: --ckpt_path: {str(bert_checkpoint)!r} was "
        "written by another recipe (data TextClassificationData); allowed: a checkpoint that "
        "`python -m recipes.resnet_finetune` wrote"
    ]


def test_a_checkpoint_with_another_class_count_is_refused_once_the_model_is_built(
    tiny, bert_checkpoint, tmp_path, capsys
):
    model_dir, _ = tiny
    two_classes = [row for row in keyword_rows(20) if row[1] != "tech"]
    data = write_csv(tmp_path / "two.csv", two_classes)
    args = tiny_args(model_dir, data, "--logger", "none", "--ckpt_path", str(bert_checkpoint))
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    last = captured.err.strip().splitlines()[-1]  # after the model's loading report
    assert last == (
        f"{PROG}: error: --ckpt_path: {str(bert_checkpoint)!r} is a checkpoint of another model "
        "(0 of this model's weights missing, 0 unknown, 2 of another shape (e.g. "
        "'network.classifier.weight')); allowed: a checkpoint that "
        f"`{PROG}` wrote with the same model and number of classes"
    )


def test_a_checkpoint_of_another_optimizer_is_one_line(tiny, bert_checkpoint, capsys):
    model_dir, data = tiny
    args = ["--logger", "none", "--optimizer", "sgd", "--ckpt_path", str(bert_checkpoint)]
    line = _one_line(capsys, tiny_args(model_dir, data, *args))
    assert line == (
        f"--optimizer: got 'sgd', but --ckpt_path {str(bert_checkpoint)!r} was trained with "
        "'adamw', whose state cannot continue as 'sgd'; allowed when resuming: --optimizer adamw "
        "(to change optimizers mid-run, use --adam_to_sgd)"
    )
