"""``python -m recipes.claims --rerun ARM/KEY``: one stored run again, compared with what it stored.

The run's command is in its record (``study/records/ARM/KEY.json``); it runs again as the
engine ran it (:mod:`recipes.sweep.child`, a fresh process, the same number of torch threads)
in a temporary folder, and its test accuracy, test loss and validation curve are compared with
the stored ones. CPU runs with one thread and the same seed are deterministic, so they must
match exactly (within 1e-6). A run the pruner stopped is refused: without the study's pruner a
rerun would train to the end.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from recipes.claims.store import StudyPaths, read_run

__all__ = ["compare_runs", "rerun"]

TOLERANCE = 1e-6


def compare_runs(stored: dict[str, Any], again: dict[str, Any]) -> list[str]:
    """What differs between a stored record and a rerun's result (empty: they match)."""
    differences = []
    for key in ("test_acc", "test_loss"):
        a, b = stored["test"].get(key), again["test"].get(key)
        if a is None or b is None or not math.isclose(a, b, rel_tol=0, abs_tol=TOLERANCE):
            differences.append(f"{key}: stored {a}, rerun {b}")
    for key in ("val_acc", "val_loss"):
        a = stored["history"].get(key, [])
        b = again["history"].get(key, [])
        same = len(a) == len(b) and all(
            x[0] == y[0] and math.isclose(x[1], y[1], rel_tol=0, abs_tol=TOLERANCE)
            for x, y in zip(a, b, strict=True)
        )
        if not same:
            differences.append(f"{key}: stored {a}, rerun {b}")
    return differences


def rerun(out: Path, name: str, threads: int = 1) -> int:
    """Rerun the stored run ``name`` (``ARM/KEY``); 0 when it matches, 1 when not."""
    arm, sep, key = name.partition("/")
    paths = StudyPaths(Path(out) / "study")
    record = read_run(paths, arm, key) if sep else None
    if record is None:
        known = (
            sorted(
                p.relative_to(paths.records).with_suffix("").as_posix()
                for p in paths.records.glob("*/*.json")
            )
            if paths.records.exists()
            else []
        )
        from recipes.claims.registry import _unknown

        raise ValueError(_unknown("rerun", name, known[:20] or ["ARM/KEY of a stored run"]))
    if record.get("pruned_at_step") is not None or record["status"] == "pruned":
        raise ValueError(
            f"rerun: got {name!r}, a run the pruner stopped at step {record['pruned_at_step']}; "
            "allowed: a run that finished (a comparison run or a finished search run)"
        )
    recipe = record["command"][2].split(".", 1)[1]
    args = record["command"][3:]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="claims-rerun-") as folder:
        result_file = Path(folder) / "result.json"
        command = [
            sys.executable,
            "-m",
            "recipes.sweep.child",
            recipe,
            str(result_file),
            *args,
            "--trainer.default_root_dir",
            folder,
        ]
        print(f"rerunning {name}: python -m recipes.{recipe} {' '.join(args)}", flush=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result_file.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            print("rerun failed:\n    " + "\n    ".join(tail), file=sys.stderr)
            return 1
        again = json.loads(result_file.read_text())
    differences = compare_runs(record, again)
    stored_acc, new_acc = record["test"].get("test_acc"), again["test"].get("test_acc")
    if differences:
        print(f"{name}: differs from the stored run:\n    " + "\n    ".join(differences))
        return 1
    print(f"{name}: matches the stored run (test accuracy {stored_acc} stored, {new_acc} rerun)")
    return 0
