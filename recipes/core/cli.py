"""The command line every recipe shares: LightningCLI with this project's optimizer registry.

``python -m recipes.<recipe> --optimizer adamw --scheduler cosine --lr 5e-5 --warmup 0.06``:

- ``--optimizer`` / ``--scheduler`` take registry names (``python -m optim_callbacks list``);
  they, ``--lr``, ``--weight_decay`` and ``--warmup`` are top-level flags that set the model's
  :class:`~recipes.core.optimization.OptimizerSettings` (``--model.optimization.*`` holds the
  rest: ``layer_decay``, ``optimizer_options``, ``scheduler_options``). LightningCLI's own
  ``--optimizer``/``--lr_scheduler`` (torch classes) are switched off.
- ``--trainer.strategy fsdp2 --trainer.devices 2``: sharded training (FSDP2,
  :class:`optim_callbacks.FSDP2Strategy`; the module's ``configure_model`` shards it);
- every Trainer, model and data option: ``--trainer.devices 2 --trainer.strategy ddp``,
  ``--trainer.precision 16-mixed``, ``--model.optimization.layer_decay 0.8``,
  ``--data.batch_size 32``;
- ``--config FILE`` (YAML), ``--print_config`` (the full configuration, then exit),
  ``--ckpt_path FILE`` (resume), ``--logger wandb|csv|tensorboard|none``, ``--project NAME``;
- one flag or YAML block per callback: ``--clipping.max_norm 0.5`` configures one,
  ``--clipping null`` (or ``--clipping false``) switches it off, ``--adam_to_sgd.at_fraction 0.5``
  switches one on.

A run fits, tests the best checkpoint, prints a test table and where the logs and checkpoints
are. A usage error (unknown optimizer, missing file or column, ...) prints one line and exits
with status 2.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import pydoc
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from optim_callbacks import (
    OPTIMIZERS,
    SCHEDULES,
    AdamToSGD,
    AmpEpsilon,
    FSDP2Strategy,
    GradientClipping,
    MomentStatistics,
    SpikeSkip,
    TrainingFindings,
    run_folder,
)
from optim_callbacks.validation import check_choice
from recipes.core.errors import UsageError
from recipes.core.legacy import upgrade_args
from recipes.core.loggers import LOGGERS, build_logger, finish_wandb_runs, run_locations
from recipes.core.optimization import TOP_LEVEL_FLAGS, OptimizerSettings
from recipes.core.parse_errors import one_line_parse_error
from recipes.core.resume_checks import check_checkpoint_fits, check_resume_checkpoint
from recipes.pages.run_page import regenerate_command, write_run_page
from recipes.pages.run_record import build_run_record, write_run_record
from recipes.sweep.recorder import RunRecorder

__all__ = ["STANDARD_CALLBACKS", "CallbackOption", "Recipe", "RecipeCLI", "format_test_table"]


@dataclass(frozen=True)
class CallbackOption:
    """A callback the recipe CLI offers as ``--<key>`` (and a ``<key>:`` YAML block).

    ``init_args`` switches it on by default with those arguments; ``None`` leaves it off until
    the user configures it. ``needs_logger`` drops it (with a note) when the run has no logger.
    """

    key: str
    callback: type[Callback]
    init_args: Mapping[str, Any] | None = field(default_factory=dict)
    needs_logger: bool = False
    help: str = ""


STANDARD_CALLBACKS: tuple[CallbackOption, ...] = (
    CallbackOption(  # before clipping, so clipping counts only the steps that are taken
        "spike_skip",
        SpikeSkip,
        help="skip optimizer steps whose loss or gradient norm spikes (mean + 6 sigma over "
        "128 steps), as if their batch was never seen",
    ),
    CallbackOption(
        "clipping", GradientClipping, {"max_norm": 1.0}, help="global-norm gradient clipping"
    ),
    CallbackOption(
        "amp_epsilon", AmpEpsilon, help="Adam epsilon raised where the optimizer state is float16"
    ),
    CallbackOption(
        "moment_stats",
        MomentStatistics,
        {"every_n_steps": 10, "per_layer_scalars": False},
        needs_logger=True,
        help="optimizer moment statistics: global curves, per-layer heatmaps "
        "(--moment_stats.per_layer_scalars true for per-layer curves too)",
    ),
    CallbackOption(
        "adam_to_sgd",
        AdamToSGD,
        None,
        help="switch from Adam to SGD, e.g. --adam_to_sgd.at_fraction 0.5",
    ),
    CallbackOption(
        "findings",
        TrainingFindings,
        help="findings in words at the end of training (log, run page, W&B)",
    ),
    CallbackOption(
        "lr_monitor",
        LearningRateMonitor,
        {"logging_interval": "step"},
        needs_logger=True,
        help="log the learning rate of every parameter group",
    ),
    CallbackOption(
        "checkpoint",
        ModelCheckpoint,
        {
            "monitor": "val_acc",
            "mode": "max",
            "filename": "epoch{epoch}-step{step}-val_acc{val_acc:.4f}",
            "auto_insert_metric_name": False,
        },
        help="keep the checkpoint with the best validation accuracy",
    ),
    CallbackOption(
        "last_checkpoint",
        ModelCheckpoint,
        {
            "monitor": None,
            "save_top_k": 0,
            "save_last": True,
            "every_n_train_steps": 50,
            "save_on_exception": True,
            "filename": "interrupted-epoch{epoch}-step{step}",
            "auto_insert_metric_name": False,
        },
        help="a rolling last.ckpt every 50 optimizer steps and at the end, and a checkpoint on "
        "Ctrl-C or a crash; resume with --ckpt_path",
    ),
)


class RunConfigSaver(SaveConfigCallback):
    """Saves the run's full configuration as ``config.yaml`` in the run's own folder (beside its
    ``checkpoints/``), not in a log folder that W&B runs share."""

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Nothing yet: the checkpoint folder is known once ModelCheckpoint is set up (it runs last)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not self.already_saved:
            self.save_config(trainer, pl_module, "fit")
            self.already_saved = True

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config, str(folder / self.config_filename), skip_none=False, overwrite=True
        )


class RecipeCLI(LightningCLI):
    """LightningCLI for one recipe: ``model_class`` must accept the registry settings of
    :class:`recipes.core.classification.ClassificationModule` plus ``num_classes`` and
    ``class_names``, which are linked from ``datamodule_class``'s attributes of those names.

    Args:
        model_class: the recipe's LightningModule; the default of its ``optimization``
            (:class:`~recipes.core.optimization.OptimizerSettings`) gives the top-level
            ``--optimizer --scheduler --lr --weight_decay --warmup`` flags their defaults.
        datamodule_class: the recipe's LightningDataModule.
        name: the recipe's name: W&B project / log folder, and ``runs/<name>`` as root folder.
        callbacks: the callbacks offered as flags (default :data:`STANDARD_CALLBACKS`).
        data_to_model: data options the model also receives (e.g. ``model_name_or_path``).
        trainer_defaults: Trainer defaults of this recipe (still overridable).
        args: arguments instead of ``sys.argv[1:]``.
    """

    def __init__(
        self,
        model_class: type[L.LightningModule],
        datamodule_class: type[L.LightningDataModule],
        *,
        name: str,
        callbacks: Sequence[CallbackOption] = STANDARD_CALLBACKS,
        data_to_model: Sequence[str] = (),
        trainer_defaults: Mapping[str, Any] | None = None,
        description: str | None = None,
        args: Sequence[str] | None = None,
    ) -> None:
        self.recipe_name = name
        self.callback_options = tuple(callbacks)
        self.data_to_model = tuple(data_to_model)
        self.test_results: dict[str, float] = {}
        defaults: dict[str, Any] = {
            "default_root_dir": f"runs/{name}",
            "max_epochs": 1,
            "log_every_n_steps": 10,
        }
        defaults.update(trainer_defaults or {})
        super().__init__(
            model_class,
            datamodule_class,
            save_config_callback=RunConfigSaver,
            trainer_defaults=defaults,
            seed_everything_default=42,
            parser_kwargs={
                "prog": f"python -m recipes.{name}",
                "description": description,
                "exit_on_error": False,  # parse_arguments reports one line instead
            },
            args=list(args) if args is not None else None,
            run=False,
            auto_configure_optimizers=False,
        )

    @property
    def prog(self) -> str:
        return f"python -m recipes.{self.recipe_name}"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        preset = _init_defaults(self.model_class).get("optimization") or OptimizerSettings()
        flags: dict[str, tuple[Any, str]] = {
            "optimizer": (str, f"optimizer name; one of: {', '.join(OPTIMIZERS.names())}"),
            "scheduler": (str, f"learning-rate schedule; one of: {', '.join(SCHEDULES.names())}"),
            "lr": (float | None, "peak learning rate (null: the optimizer's default)"),
            "weight_decay": (
                float | None,
                "weight decay, never on biases and norms (null: the optimizer's default)",
            ),
            "warmup": (
                int | float,
                "linear warmup: steps (an int) or a fraction of all steps (a float)",
            ),
        }
        for flag, (kind, help_text) in flags.items():
            parser.add_argument(
                f"--{flag}", type=kind, default=getattr(preset, flag), help=help_text
            )
            parser.link_arguments(flag, f"model.optimization.{flag}")
        parser.add_argument(
            "--logger",
            type=str,
            default="wandb",
            help=f"experiment logger; one of: {', '.join(LOGGERS)}",
        )
        parser.add_argument(
            "--project", type=str, default=self.recipe_name, help="W&B project / log folder name"
        )
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="checkpoint to resume training from"
        )
        for option in self.callback_options:
            init_args = option.init_args
            default = lazy_instance(option.callback, **init_args) if init_args is not None else None
            state = "on" if default is not None else "off"
            parser.add_argument(
                f"--{option.key}",
                type=option.callback | None,
                default=default,
                help=f"{option.help} ({state} by default; null or false: off)",
            )
        for name in ("num_classes", "class_names"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        for name in self.data_to_model:
            parser.link_arguments(f"data.{name}", f"model.{name}")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse (configurations of earlier versions upgraded), then check names and settings
        before anything is seeded, read or loaded."""
        args = _join_negative_numbers(upgrade_args(sys.argv[1:] if args is None else args))
        args = _false_means_off(args, [option.key for option in self.callback_options])
        self.run_args = list(args)
        try:
            self.config = parser.parse_args(args)
        except argparse.ArgumentError as error:
            flags = [f"--{key}" for key in parser.get_defaults().keys()]  # noqa: SIM118 (a Namespace)
            raise UsageError(one_line_parse_error(str(error), flags)) from None
        config = self.config
        check_choice("logger", config.logger, LOGGERS)
        _check_settings(config.model.optimization)
        for option in self.callback_options:
            _check_callback(option.key, config.get(option.key))
        _check_root_dir(config.trainer.get("default_root_dir"))
        check_resume_checkpoint(
            config.ckpt_path,
            model_class=self.model_class,
            datamodule_class=self.datamodule_class,
            optimizer=config.model.optimization.optimizer,
            prog=self.prog,
        )
        if config.trainer.get("gradient_clip_val") and config.get("clipping") is not None:
            raise UsageError(
                f"--trainer.gradient_clip_val: got {config.trainer.gradient_clip_val}, but the "
                "clipping callback clips the same gradients; allowed: one of the two, e.g. "
                f"--clipping.max_norm {config.trainer.gradient_clip_val} alone, or "
                "--clipping null with --trainer.gradient_clip_val"
            )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self.config_init.trainer
        logger = trainer_config.get("logger")
        if logger is None:  # --trainer.logger not given: --logger decides
            logger = build_logger(
                self.config_init.logger,
                trainer_config.default_root_dir or ".",
                self.config_init.project,
            )
        callbacks = list(trainer_config.get("callbacks") or [])
        for option in self.callback_options:
            callback = self.config_init.get(option.key)
            if callback is None:
                continue
            if option.needs_logger and not logger:
                rank_zero_info(f"{option.key}: off, because the run has no logger")
                continue
            if (
                isinstance(callback, ModelCheckpoint)
                and trainer_config.get("enable_checkpointing") is False
            ):
                continue
            callbacks.append(callback)
        if not any(isinstance(c, RunRecorder) for c in callbacks):
            callbacks.append(RunRecorder())  # the curves of the run's page (run_record.json)
        if trainer_config.get("strategy") == "fsdp2":
            kwargs["strategy"] = fsdp2_strategy(trainer_config)
        return super().instantiate_trainer(logger=logger, callbacks=callbacks, **kwargs)

    def fit_and_test(self) -> dict[str, float]:
        """Fit (resuming from ``--ckpt_path`` if given), test the best checkpoint, report."""
        trainer = self.trainer
        check_checkpoint_fits(self.config.ckpt_path, self.model, self.prog)
        trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.ckpt_path)
        locations = (
            run_locations(trainer) if trainer.is_global_zero else []
        )  # before test() reloads state
        checkpoint = trainer.checkpoint_callback
        best = (
            "best"
            if checkpoint is not None and getattr(checkpoint, "best_model_path", "")
            else None
        )
        self.test_results = trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False
        )[0]
        tested = getattr(self.model, "tested_examples", None)  # a collective: every rank
        examples = tested() if tested is not None else len(trainer.test_dataloaders.dataset)
        if trainer.is_global_zero:
            source = "best checkpoint" if best else "final weights"
            print(
                format_test_table(
                    self.test_results, f"Test results ({examples} examples, {source})"
                )
            )
            locations += self._write_page(examples, source)
            print("\n".join(locations))
        finish_wandb_runs(trainer)
        return self.test_results

    def _write_page(self, examples: int, source: str) -> list[str]:
        """Write ``run_record.json`` and ``run.html`` into the run folder; the lines naming them."""
        record = build_run_record(
            self.trainer,
            recipe=self.recipe_name,
            args=self.run_args,
            settings=run_settings(self.config),
            test_results=self.test_results,
            tested_examples=examples,
            test_source=source,
        )
        folder = run_folder(self.trainer)
        write_run_record(folder, record)
        page = write_run_page(folder)
        return [
            f"Run page: {page.resolve().as_uri()}",
            f"  draw again: {regenerate_command(folder)}",
        ]


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _join_negative_numbers(args: Sequence[str]) -> list[str]:
    """``--lr -1e-4`` → ``--lr=-1e-4``: argparse would read ``-1e-4`` as an option name."""
    joined: list[str] = []
    for token in args:
        previous = joined[-1] if joined else ""
        if _NEGATIVE_NUMBER.fullmatch(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def _false_means_off(args: Sequence[str], keys: Sequence[str]) -> list[str]:
    """``--findings false`` (or ``--findings=false``) → ``--findings null``: a callback flag
    switched off in the words a user reaches for first (the parser alone would reject the
    boolean). Only the value right after a callback flag is read this way."""
    flags = {f"--{key}" for key in keys}
    rewritten: list[str] = []
    for token in args:
        name, sep, value = token.partition("=")
        previous = rewritten[-1] if rewritten else ""
        if sep and name in flags and value.lower() == "false":
            rewritten.append(f"{name}=null")
        elif not sep and token.lower() == "false" and previous in flags:
            rewritten.append("null")
        else:
            rewritten.append(token)
    return rewritten


def _check_settings(settings: Mapping[str, Any]) -> None:
    """The registry entries' checks of the optimizer settings; the message names the flag."""
    try:
        OptimizerSettings(**settings)
    except ValueError as error:
        reason = str(error)
        name = reason.split(":", 1)[0]
        if name in TOP_LEVEL_FLAGS:
            raise UsageError(f"--{reason}") from None
        for options in ("optimizer_options", "scheduler_options"):
            if name in (settings.get(options) or {}):
                raise UsageError(f"--model.optimization.{options}.{reason}") from None
        raise UsageError(f"--model.optimization.{reason}") from None


def _check_root_dir(root: str | None) -> None:
    """``--trainer.default_root_dir`` must be, or be creatable as, a writable folder (checked
    without creating it: the nearest existing folder above it must be writable)."""
    if not root:
        return
    path = Path(root).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(
            f"--trainer.default_root_dir: got {root!r}, but {str(existing)!r} is a file; "
            "allowed: a folder path (created if missing)"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--trainer.default_root_dir: got {root!r}, but {str(existing)!r} is not writable; "
            "allowed: a folder this user can write to"
        )


def _check_callback(key: str, config: Any) -> None:
    """Build the callback ``--<key>`` describes once, so that its own checks report before the
    run seeds, reads data or loads a model; its message gets the flag's name."""
    if config is None or not hasattr(config, "class_path"):
        return
    callback_class = pydoc.locate(config.class_path)
    if not callable(callback_class):
        raise UsageError(
            f"--{key}: got class_path {config.class_path!r}; allowed: a callback class"
        )
    init_args = config.get("init_args")
    try:
        callback_class(**(init_args.as_dict() if init_args is not None else {}))
    except (ValueError, TypeError, MisconfigurationException) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        separator = "." if re.match(r"\w+: got ", reason) else ": "
        raise UsageError(f"--{key}{separator}{reason}") from None


def fsdp2_strategy(trainer_config: Mapping[str, Any]) -> FSDP2Strategy:
    """``--trainer.strategy fsdp2``: FSDP2 data parallelism over every process (devices x
    nodes); ``--trainer.devices`` must say how many devices."""
    devices = trainer_config.get("devices")
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UsageError(
            f"--trainer.devices: got {devices!r}; allowed with --trainer.strategy fsdp2: a "
            "number of devices (e.g. 2) or a list of device indices"
        )
    return FSDP2Strategy(data_parallel_size=count * int(trainer_config.get("num_nodes") or 1))


def _init_defaults(cls: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def run_settings(config: Any) -> dict[str, Any]:
    """The settings a run's page shows first: optimizer, schedule, precision, length, batch."""
    optimization = config.model.optimization
    trainer = config.trainer
    settings = {
        key: optimization.get(key)
        for key in ("optimizer", "scheduler", "lr", "weight_decay", "warmup", "layer_decay")
    }
    for key in ("precision", "max_epochs", "max_steps", "devices", "strategy"):
        value = trainer.get(key)
        settings[key] = value if isinstance(value, (str, int, float)) else None
    data = config.get("data")
    for key in ("batch_size", "model_name_or_path", "dataset"):
        value = data.get(key) if data is not None else None
        settings[key] = value if isinstance(value, (str, int, float)) else None
    return settings


def format_test_table(results: Mapping[str, float], title: str) -> str:
    """Accuracy, macro F1 and loss as a small table."""
    rows = [("accuracy", "test_acc"), ("macro F1", "test_f1"), ("loss", "test_loss")]
    lines = [title, f"{'metric':<10} {'value':>8}", f"{'-' * 10} {'-' * 8}"]
    lines += [f"{label:<10} {float(results[key]):>8.4f}" for label, key in rows if key in results]
    return "\n".join(lines)


def _usage_error(prog: str, error: BaseException) -> SystemExit:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return SystemExit(2)


@dataclass(frozen=True)
class Recipe:
    """What a recipe entry point is made of: its module classes and CLI options.

    ``run(args)`` parses, builds, fits and tests (a usage error exits with status 2 and one line
    on stderr); ``configuration(args)`` only parses and checks, and returns the configuration
    the recipe would run with (what ``--print_config`` prints), without seeding, reading data or
    loading a model.
    """

    model_class: type[L.LightningModule]
    datamodule_class: type[L.LightningDataModule]
    name: str
    description: str = ""
    data_to_model: tuple[str, ...] = ()
    trainer_defaults: Mapping[str, Any] | None = None

    @property
    def prog(self) -> str:
        return f"python -m recipes.{self.name}"

    def _cli(self, cli_class: type[RecipeCLI], args: Sequence[str] | None) -> RecipeCLI:
        return cli_class(
            self.model_class,
            self.datamodule_class,
            name=self.name,
            data_to_model=self.data_to_model,
            trainer_defaults=self.trainer_defaults,
            description=self.description,
            args=args,
        )

    def configuration(self, args: Sequence[str]) -> Any:
        """The parsed, checked configuration for ``args`` (a jsonargparse ``Namespace``)."""
        try:
            self._cli(_ConfigurationOnly, list(args))
        except _Parsed as parsed:
            return parsed.config
        raise AssertionError("unreachable: _ConfigurationOnly always stops after parsing")

    def run(self, args: Sequence[str] | None = None) -> RecipeCLI:
        """Parse, build, fit and test; returns the finished CLI."""
        seed_log = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_log.level
        seed_log.setLevel(logging.WARNING)  # "Seed set to 42" would precede a one-line usage error
        try:  # everything the user gave is checked here: names, files, columns, classes, options
            cli = self._cli(RecipeCLI, args)
        except (ValueError, OSError) as error:
            raise _usage_error(self.prog, error) from None
        finally:
            seed_log.setLevel(level)
        try:
            cli.fit_and_test()
        except UsageError as error:
            raise _usage_error(self.prog, error) from None
        return cli


class _Parsed(Exception):
    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


class _ConfigurationOnly(RecipeCLI):
    """Stops right after parsing and checking, before the seed is set or anything is built."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(self.config)
