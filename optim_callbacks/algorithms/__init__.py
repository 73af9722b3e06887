"""The optimizers this package implements or extends, one module each.

Each has its paper in its module docstring and a ``fused=True`` path compiled by
:mod:`optim_callbacks.compiled_update`, which the registry picks by default.
"""

from optim_callbacks.algorithms.adabelief import AdaBelief
from optim_callbacks.algorithms.adadelta import Adadelta
from optim_callbacks.algorithms.adopt import ADOPT
from optim_callbacks.algorithms.lamb import LAMB
from optim_callbacks.algorithms.lion import Lion
from optim_callbacks.algorithms.muon import MuonWithAdamW
from optim_callbacks.algorithms.rmsprop import RMSprop
from optim_callbacks.algorithms.schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD

__all__ = [
    "ADOPT",
    "LAMB",
    "AdaBelief",
    "Adadelta",
    "Lion",
    "MuonWithAdamW",
    "RMSprop",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
]
