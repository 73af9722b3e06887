"""Where a run's own files go: the folder above its checkpoints.

Lightning puts checkpoints in ``<logger folder>/checkpoints`` (``<save_dir>/<project>/<run id>``
with W&B, ``<save_dir>/<name>/version_<n>`` with CSV or TensorBoard). The folder above is the
run's: a run's configuration, heatmaps and page go there, beside the checkpoints they belong to.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

__all__ = ["run_folder"]


def run_folder(trainer: pl.Trainer) -> Path:
    """The parent of the checkpoint folder; without checkpoints the logger's folder, else the
    Trainer's ``default_root_dir``.

    Safe to call on one rank: ``trainer.log_dir`` would broadcast (a collective), so the
    logger's own ``log_dir`` (CSV, TensorBoard) or ``save_dir`` (W&B) is read instead.
    """
    checkpoint = trainer.checkpoint_callback
    dirpath = getattr(checkpoint, "dirpath", None)
    if dirpath:
        return Path(dirpath).parent
    logger = trainer.logger
    folder = None
    if logger is not None:
        folder = getattr(logger, "log_dir", None) or logger.save_dir
    return Path(folder or trainer.default_root_dir)
