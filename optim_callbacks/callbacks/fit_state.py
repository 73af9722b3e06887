"""``FitStateCallback``: a callback whose saved state belongs to fitting.

Lightning restores every callback's state whenever it loads a checkpoint, also for
``trainer.test(ckpt_path="best")``. State that records the run so far (a history of logged
values, say) must not roll back to the best checkpoint's step then; it is restored only when a
fit resumes.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["FitStateCallback"]


class FitStateCallback(Callback):
    """Subclasses implement :meth:`load_fit_state`; it runs only for a checkpoint a fit resumes
    from (``Trainer.fit(..., ckpt_path=...)``), never for test, validate or predict."""

    _restoring_fit = False

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._restoring_fit = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._restoring_fit:
            self._restoring_fit = False
            self.load_fit_state(state_dict)

    def load_fit_state(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (called only when a fit resumes)."""
