"""Switch schedule-free optimizers between train and eval mode at the right moments.

A schedule-free optimizer (Defazio et al., 2024) trains at one point ``y`` and should be
evaluated, tested and saved at another, the average ``x``: ``optimizer.train()`` puts ``y``
into the parameters, ``optimizer.eval()`` puts ``x``. Forgetting ``eval()`` silently evaluates
the wrong weights. :class:`ScheduleFreeModes` does it for every optimizer of the trainer that
has ``train()``/``eval()`` methods (ours and the ``schedulefree`` package's):

- train mode before every training batch;
- eval mode before validation, test and prediction, and at the end of fit;
- checkpoints hold the eval weights ``x``: when Lightning saves during training (train mode),
  the callback switches to eval, writes the model and optimizer state again into the
  checkpoint, and switches back. Our optimizers also keep ``y`` in the optimizer state of
  that checkpoint (``keep_train_point``): switching back restores it exactly, in the running
  fit and in a fit resumed from the checkpoint, so a mid-epoch resume continues bit for bit
  (tested by the conformance matrix);
- validation inside fit keeps ``y`` the same way, so validating does not round the training
  point (``y -> x -> y`` is not exact in floating point) and a resume continues exactly
  whether or not the run it continues validated after the checkpoint. The cost is one copy
  of the parameters while validation runs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer

from optim_callbacks.schedules import is_schedule_free

__all__ = ["ScheduleFreeModes"]


def _in_train_mode(optimizer: Optimizer) -> bool:
    return bool(optimizer.param_groups[0].get("train_mode", False))


class ScheduleFreeModes(Callback):
    """Calls ``optimizer.train()`` / ``optimizer.eval()`` for schedule-free optimizers (see the
    module docstring); does nothing for any other optimizer."""

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[Optimizer]:
        return [opt for opt in trainer.optimizers if is_schedule_free(opt)]

    def _set(self, trainer: pl.Trainer, *, train: bool, keep: bool = False) -> None:
        """Switch modes; with ``keep``, our optimizers first keep ``y`` so that training
        resumes from its exact bits (``keep_train_point``)."""
        for optimizer in self._optimizers(trainer):
            if _in_train_mode(optimizer) == train:
                continue
            if train:
                optimizer.train()
                continue
            if keep and hasattr(optimizer, "keep_train_point"):
                optimizer.keep_train_point()
            optimizer.eval()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set(trainer, train=True)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # inside fit, training goes on from y: keep it, so a validation does not round it (and
        # a checkpoint saved after this validation resumes from the same bits)
        self._set(trainer, train=False, keep=trainer.state.fn == TrainerFn.FITTING)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(trainer, train=False)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(trainer, train=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(trainer, train=False)

    @torch.no_grad()
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        training = [opt for opt in self._optimizers(trainer) if _in_train_mode(opt)]
        if not training:
            return  # already the eval weights (saved after validation, or at the end)
        for optimizer in training:
            if hasattr(optimizer, "keep_train_point"):
                optimizer.keep_train_point()  # y rides along in the optimizer state
            optimizer.eval()
        state = trainer.strategy.lightning_module_state_dict()
        checkpoint["state_dict"] = {
            key: value.detach().clone() if isinstance(value, torch.Tensor) else value
            for key, value in state.items()
        }
        if "optimizer_states" in checkpoint:
            checkpoint["optimizer_states"] = [
                trainer.strategy.optimizer_state(opt) for opt in trainer.optimizers
            ]
        for optimizer in training:
            optimizer.train()
