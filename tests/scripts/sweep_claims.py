"""One of several processes racing on one study's storage, as sweep workers do.

    python tests/scripts/sweep_claims.py STORAGE_URL START_AT [open]

Waits until the wall clock reaches ``START_AT`` (so the processes start together), then tries
``WAITING -> RUNNING`` on every queued trial of the study ``race`` through
``recipes.sweep.storage.open_storage`` and prints the numbers it claimed as JSON. With
``open``, it opens the storage (a new database: creating Optuna's tables) at ``START_AT`` and
prints the number of studies it holds instead.
"""

from __future__ import annotations

import json
import sys
import time

import optuna

from recipes.sweep.storage import open_storage

url, start_at = sys.argv[1], float(sys.argv[2])
if sys.argv[3:] == ["open"]:
    time.sleep(max(0.0, start_at - time.time()))
    print(json.dumps(len(open_storage(url).get_all_studies())))
    sys.exit()
storage = open_storage(url)
study = optuna.load_study(study_name="race", storage=storage)
waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
time.sleep(max(0.0, start_at - time.time()))
claimed = [
    trial.number
    for trial in waiting
    if storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.RUNNING)
]
print(json.dumps(claimed))
