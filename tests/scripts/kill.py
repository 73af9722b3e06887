"""A callback that sends its own process a signal after optimizer step ``$KILL_AFTER_STEP``:
``$KILL_SIGNAL`` (default 9, SIGKILL: the way an OOM killer or a preempted node ends a run, no
hook, no handler, no cleanup) or 2 (SIGINT: Ctrl-C).

Added to a recipe run with ``--trainer.callbacks+=tests.scripts.kill.KillAfterStep``. Lightning
runs checkpoint callbacks after every other callback, so a checkpoint due at that same step is
never written: the newest one on disk is the one before.
"""

from __future__ import annotations

import os
import signal
import time

from lightning.pytorch.callbacks import Callback


class KillAfterStep(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != int(os.environ["KILL_AFTER_STEP"]):
            return
        number = int(os.environ.get("KILL_SIGNAL", signal.SIGKILL))
        # Pressed again every 0.1 s, as a user would, should the KeyboardInterrupt of a SIGINT
        # surface in a finalizer (which swallows it) rather than here; SIGKILL never returns.
        for _ in range(50):
            os.kill(os.getpid(), number)
            time.sleep(0.1)
        raise RuntimeError(f"KillAfterStep: signal {number} did not end the run in 5 s")
