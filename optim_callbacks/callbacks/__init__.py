"""Lightning callbacks, one concern per file."""

from optim_callbacks.callbacks.amp_epsilon import AmpEpsilon
from optim_callbacks.callbacks.clipping import GradientClipping
from optim_callbacks.callbacks.fit_state import FitStateCallback
from optim_callbacks.callbacks.moment_stats import MomentStatistics
from optim_callbacks.callbacks.optimizer_switch import AdamToSGD, OptimizerSwitch
from optim_callbacks.callbacks.schedule_free import ScheduleFreeModes
from optim_callbacks.callbacks.spike_skip import SpikeSkip

__all__: list[str] = [
    "AdamToSGD",
    "AmpEpsilon",
    "FitStateCallback",
    "GradientClipping",
    "MomentStatistics",
    "OptimizerSwitch",
    "ScheduleFreeModes",
    "SpikeSkip",
]
