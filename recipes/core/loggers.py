"""Experiment loggers by name, W&B offline unless credentials exist, and where a run's files are.

W&B runs online only when credentials are configured (``WANDB_API_KEY``, or a ``~/.netrc``
entry for the W&B host that ``wandb login`` writes); otherwise offline, writing
``<save_dir>/wandb/offline-run-*`` for ``wandb leet`` (view) and ``wandb sync`` (upload later).
An explicit ``WANDB_MODE`` always wins.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

from optim_callbacks.validation import check_choice

__all__ = [
    "LOGGERS",
    "build_logger",
    "finish_wandb_runs",
    "run_locations",
    "wandb_credentials_configured",
    "wandb_mode",
]

LOGGERS = ("wandb", "csv", "tensorboard", "none")


def wandb_credentials_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``wandb`` could log in: an API key in the environment or a netrc entry for the
    W&B host (``WANDB_BASE_URL``, default ``api.wandb.ai``; netrc file ``$NETRC`` or ``~/.netrc``)."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    netrc_file = environ.get("NETRC") or str(Path(environ.get("HOME") or Path.home()) / ".netrc")
    try:
        entry = netrc.netrc(netrc_file).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None and bool(entry[2])


def wandb_mode(environ: Mapping[str, str] | None = None) -> str:
    """``$WANDB_MODE`` if set, else ``online`` with credentials and ``offline`` without."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if wandb_credentials_configured(environ) else "offline"


def build_logger(kind: str, save_dir: str | Path, project: str) -> Logger | bool:
    """The logger called ``kind`` (``wandb``, ``csv``, ``tensorboard``, ``none``) writing under
    ``save_dir``; ``False`` (no logger) for ``none``."""
    check_choice("logger", kind, LOGGERS)
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir, name=project)
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir, name=project)
    Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb wants its dir to exist
    return WandbLogger(project=project, save_dir=str(save_dir), offline=wandb_mode() == "offline")


def run_locations(trainer: L.Trainer) -> list[str]:
    """Lines saying where the run's logs and checkpoints are and how to look at them."""
    lines = []
    logger = trainer.logger
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        run_dir = Path(run.dir).parent  # run.dir is the run's files/ folder
        if getattr(run, "offline", False) or not getattr(run, "url", None):
            lines.append(f"W&B run (offline): {run_dir}")
            lines.append(f"  view:   wandb leet {run_dir}")
            lines.append(f"  upload: wandb sync {run_dir}")
        else:
            lines.append(f"W&B run: {run.url} (local files: {run_dir})")
    elif isinstance(logger, TensorBoardLogger):
        lines.append(f"TensorBoard logs: {logger.log_dir}")
        lines.append(f"  view: tensorboard --logdir {logger.log_dir}")
    elif isinstance(logger, CSVLogger):
        lines.append(f"CSV metrics: {Path(logger.log_dir) / 'metrics.csv'}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "best_model_path", ""):
        lines.append(f"Best checkpoint: {checkpoint.best_model_path}")
    last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "")
    if last:
        lines.append(f"Last checkpoint: {last} (resume with --ckpt_path {last})")
    return lines


def finish_wandb_runs(trainer: L.Trainer) -> None:
    """Close this run's W&B runs (rank zero) once fit and test are done, so that their files
    are complete when ``Recipe.run`` returns (to a sweep, a notebook, a test), not only at
    interpreter exit."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
