"""optim-callbacks: optimizers and schedules by name, and Lightning callbacks that watch and
steer them (clipping, AMP epsilon, Adam->SGD switching, moment statistics)."""

from optim_callbacks.algorithms import *  # noqa: F403
from optim_callbacks.algorithms import __all__ as _algorithms_all
from optim_callbacks.callbacks import *  # noqa: F403
from optim_callbacks.callbacks import __all__ as _callbacks_all
from optim_callbacks.health import Finding, TrainingFindings, diagnose
from optim_callbacks.moment_history import MomentHistory
from optim_callbacks.optimizers import (
    OPTIMIZERS,
    SCHEDULE_FREE,
    OptimizerSpec,
    build_optimizer,
    register_optimizer,
    spec_for,
)
from optim_callbacks.param_groups import (
    global_batch_size,
    no_decay_parameter_names,
    param_groups,
    scale_lr,
)
from optim_callbacks.registry import Registry
from optim_callbacks.run_files import run_folder
from optim_callbacks.schedules import (
    SCHEDULES,
    ScheduleSpec,
    build_scheduler,
    lightning_scheduler_config,
    register_schedule,
    schedule_multiplier,
)
from optim_callbacks.strategies import FSDP2Strategy, shard_data_parallel

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "FSDP2Strategy",
    "MomentHistory",
    "OPTIMIZERS",
    "SCHEDULE_FREE",
    "SCHEDULES",
    "OptimizerSpec",
    "Registry",
    "ScheduleSpec",
    "build_optimizer",
    "build_scheduler",
    "global_batch_size",
    "lightning_scheduler_config",
    "no_decay_parameter_names",
    "param_groups",
    "register_optimizer",
    "register_schedule",
    "run_folder",
    "scale_lr",
    "shard_data_parallel",
    "schedule_multiplier",
    "spec_for",
    "TrainingFindings",
    "diagnose",
    *_algorithms_all,
    *_callbacks_all,
]
