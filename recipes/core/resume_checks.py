"""``--ckpt_path`` checked before training resumes from it, with one line for each way it can be
wrong: missing, not a checkpoint (random bytes, truncated), another recipe's, another optimizer
than the one the run is configured with (all before anything is built), or weights of another
shape, e.g. another number of classes (once the model is built).

The file is opened memory-mapped with ``weights_only=True`` (what Lightning itself loads a
checkpoint with), so the check costs a fraction of the real load and never unpickles code.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule

from recipes.core.errors import UsageError

__all__ = ["LIGHTNING_CHECKPOINT_NAMES", "check_checkpoint_fits", "check_resume_checkpoint"]

# Hyper-parameters LightningCLI adds to the module's own.
_LIGHTNING_HPARAMS = {"_instantiator", "_class_path"}
# ckpt_path values Lightning resolves itself (the newest / best checkpoint of this run, ...).
LIGHTNING_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")


def _load(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        first_line = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        raise UsageError(
            f"--ckpt_path: {str(path)!r} is not a checkpoint that can be read ({type(error).__name__}"
            f"{': ' + first_line if first_line else ''}); allowed: a .ckpt file a run of this "
            "project wrote, complete (e.g. runs/<recipe>/.../checkpoints/last.ckpt)"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(
            f"--ckpt_path: {str(path)!r} holds no Lightning training state (no 'state_dict'); "
            "allowed: a .ckpt file a Lightning run wrote"
        )
    return checkpoint


def _check_model(path: Path, saved: dict[str, Any], model: LightningModule, prog: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    reshaped = [
        key
        for key, value in expected.items()
        if key in saved and tuple(saved[key].shape) != tuple(value.shape)
    ]
    if not (missing or unexpected or reshaped):
        return
    example = (missing or unexpected or reshaped)[0]
    detail = (
        f"{len(missing)} of this model's weights missing, {len(unexpected)} unknown, "
        f"{len(reshaped)} of another shape (e.g. {example!r})"
    )
    raise UsageError(
        f"--ckpt_path: {str(path)!r} is a checkpoint of another model ({detail}); allowed: a "
        f"checkpoint that `{prog}` wrote with the same model and number of classes"
    )


def _check_optimizer(path: Path, checkpoint: dict[str, Any], optimizer: str | None) -> None:
    saved = ((checkpoint.get("hyper_parameters") or {}).get("optimization") or {}).get("optimizer")
    if optimizer is None or saved is None or saved == optimizer:
        return
    raise UsageError(
        f"--optimizer: got {optimizer!r}, but --ckpt_path {str(path)!r} was trained with "
        f"{saved!r}, whose state cannot continue as {optimizer!r}; allowed when resuming: "
        f"--optimizer {saved} (to change optimizers mid-run, use --adam_to_sgd)"
    )


def _checkpoint_file(ckpt_path: str | None) -> Path | None:
    """The file to check, or ``None`` for nothing to check (no path, one of Lightning's names,
    a distributed-checkpoint folder the strategy reads itself)."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CHECKPOINT_NAMES:
        return None
    path = Path(ckpt_path).expanduser()
    if (path / ".metadata").is_file():
        return None
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(
            f"--ckpt_path: {ckpt_path!r} {where}; allowed: an existing .ckpt file (a run keeps "
            "checkpoints/last.ckpt), or 'last' for this run's newest"
        )
    return path


def _check_recipe(
    path: Path, checkpoint: dict[str, Any], model_class: type, datamodule_class: type, prog: str
) -> None:
    """Lightning stores the data module's state under its class name and the module's
    ``__init__`` arguments as hyper-parameters: both say which recipe wrote a checkpoint."""
    init_args = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    saved_args = set(checkpoint.get("hyper_parameters") or {}) - _LIGHTNING_HPARAMS
    data_states = [key for key in checkpoint if key[:1].isupper()]  # class names
    foreign_args = sorted(saved_args - init_args)
    foreign_data = data_states and datamodule_class.__qualname__ not in data_states
    if not (foreign_args or foreign_data):
        return
    what = (
        f"data {', '.join(data_states)}" if foreign_data else f"options {', '.join(foreign_args)}"
    )
    raise UsageError(
        f"--ckpt_path: {str(path)!r} was written by another recipe ({what}); allowed: a "
        f"checkpoint that `{prog}` wrote"
    )


def check_resume_checkpoint(
    ckpt_path: str | None,
    *,
    model_class: type[LightningModule],
    datamodule_class: type,
    optimizer: str | None,
    prog: str,
) -> None:
    """Before anything is built: raise a one-line :class:`UsageError` unless ``ckpt_path`` is
    a readable checkpoint of this recipe (``model_class`` and ``datamodule_class``) trained with
    the registry ``optimizer``. ``None`` and Lightning's own names (``last``, ...) pass."""
    path = _checkpoint_file(ckpt_path)
    if path is None:
        return
    checkpoint = _load(path)
    _check_recipe(path, checkpoint, model_class, datamodule_class, prog)
    _check_optimizer(path, checkpoint, optimizer)


def check_checkpoint_fits(ckpt_path: str | None, model: LightningModule, prog: str) -> None:
    """Once the model is built: raise a one-line :class:`UsageError` unless the weights of
    ``ckpt_path`` have this model's names and shapes (e.g. the same number of classes)."""
    path = _checkpoint_file(ckpt_path)
    if path is not None:
        _check_model(path, _load(path)["state_dict"], model, prog)
