"""One run of a comparison sweep, in its own process: a recipe run with a :class:`RunRecorder`.

    python -m recipes.sweep.child RECIPE RESULT_FILE [recipe options ...]

The sweep (:mod:`recipes.compare`) starts one of these per optimizer and seed, so every run
starts from a fresh process: the peak memory is the run's own, a crash ends one run only, and
DDP (``--trainer.strategy ddp``) can relaunch the command. The recipe's ``run`` function gets the
options plus the recorder (appended to ``--trainer.callbacks``), and for an LR-search trial the
pruning callback (:class:`recipes.sweep.pruning.TrialPruning`, when the sweep set
``OPTIM_SWEEP_TRIAL_ID``); when fit and test are done,
global rank zero writes ``RESULT_FILE`` (JSON, written to a temporary name first, so the file
exists only for a finished run): the recorder's summary, the test metrics, the step count, the
run's wall time, its process's peak resident memory and the step a pruner stopped it at.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.sweep.files import write_json
from recipes.sweep.processes import die_with_parent

__all__ = [
    "RECORDER_CLASS",
    "machine_description",
    "main",
    "peak_process_memory_bytes",
    "run_recipe",
]

RECORDER_CLASS = "recipes.sweep.recorder.RunRecorder"
PRUNING_CLASS = "recipes.sweep.pruning.TrialPruning"
TRIAL_ENV = "OPTIM_SWEEP_TRIAL_ID"  # recipes.sweep.pruning.TRIAL_ENV, without importing optuna


def peak_process_memory_bytes() -> int:
    """The largest resident set size this process had (``getrusage``: KiB on Linux, bytes on
    macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def machine_description() -> str:
    """CPU model and cores, accelerator, torch version: where a measurement was taken."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts.append(f"torch {torch.__version__}, intra-op threads: {torch.get_num_threads()}")
    return ", ".join(parts)


def run_recipe(recipe: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``recipes.<recipe>`` with ``args`` and the recorder; the run's results."""
    from lightning.pytorch.loggers import WandbLogger

    from optim_callbacks import run_folder
    from recipes.sweep.recorder import RunRecorder

    started = time.perf_counter()
    module = importlib.import_module(f"recipes.{recipe}")
    callbacks = [f"--trainer.callbacks+={RECORDER_CLASS}"]
    if os.environ.get(TRIAL_ENV):
        callbacks.append(f"--trainer.callbacks+={PRUNING_CLASS}")
    cli = module.run([*args, *callbacks])
    trainer = cli.trainer
    (recorder,) = [c for c in trainer.callbacks if isinstance(c, RunRecorder)]
    pruned_at = [c.pruned_at_step for c in trainer.callbacks if type(c).__name__ == "TrialPruning"]
    wandb_dir = None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            wandb_dir = str(Path(logger.experiment.dir).parent)  # .dir is the run's files/
    if wandb_dir is not None:
        import wandb

        # Flush the run and stop W&B's service now, so once result.json exists the run's W&B
        # files are complete and nothing writes into the finished run's folder any more.
        wandb.finish()
        wandb.teardown()
    return {
        **recorder.summary(),
        "test": {key: float(value) for key, value in cli.test_results.items()},
        "global_step": trainer.global_step,
        "device": str(cli.model.device.type),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "run_seconds": time.perf_counter() - started,
        "peak_process_memory_bytes": peak_process_memory_bytes(),
        "wandb_run_dir": wandb_dir,
        "run_folder": str(run_folder(trainer)),
        "machine": machine_description(),
        "pruned_at_step": pruned_at[0] if pruned_at else None,
        "is_global_zero": trainer.is_global_zero,
    }


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m recipes.sweep.child RECIPE RESULT_FILE [options]", file=sys.stderr)
        raise SystemExit(2)
    recipe, result_file, *args = argv
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        # A DDP rank that Lightning started from rank zero's process: it dies with that process
        # (which dies with the sweep), instead of waiting on a collective that never comes.
        parent = os.getppid()
        die_with_parent()
        if os.getppid() != parent:  # rank zero was gone before the death signal was set
            raise SystemExit(1)
    result = run_recipe(recipe, args)
    if result.pop("is_global_zero"):
        write_json(Path(result_file), result)


if __name__ == "__main__":
    main()
