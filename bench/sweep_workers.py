"""Wall time of one small comparison sweep with 1 worker x 2 torch threads against 2 workers x
1 thread, side by side in one process (the two alternate, ``--rounds`` times each).

    python bench/sweep_workers.py [--rounds 1] [--steps 30]

The sweep: a random 2-layer BERT (``tests/recipes/tiny_text.py``) on the keyword CSV, adamw and
sgd at fixed LRs, two seeds each (4 runs of ``--steps`` steps, CSV logger), each run a fresh
process as always. Each configuration gets a fresh sweep folder, so nothing is reused. Prints
each wall time and the ratio (1 worker x 2 threads) / (2 workers x 1 thread): above 1 means two
workers finish the sweep sooner. On a CPU shared with other jobs, compare only times taken in
the same run of this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.recipes.tiny_text import keyword_rows, save_tiny_bert, write_csv  # noqa: E402

CONFIGS = {"1 worker x 2 threads": (1, 2), "2 workers x 1 thread": (2, 1)}


def sweep_seconds(
    folder: Path, model: Path, data: Path, workers: int, threads: int, steps: int
) -> float:
    command = [
        sys.executable, "-m", "recipes.compare", "--recipe", "bert_finetune",
        "--optimizers", "adamw,sgd", "--lrs", "adamw=3e-3,sgd=0.3", "--seeds", "2",
        "--workers", str(workers), "--threads", str(threads), "--out", str(folder),
        "--data.dataset", str(data), "--data.model_name_or_path", str(model),
        "--data.max_length", "24", "--data.batch_size", "8", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--logger", "csv",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(REPO)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=folder.parent, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_tiny_bert(root / "bert")
        data = write_csv(root / "keywords.csv", keyword_rows())
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for round_ in range(options.rounds):
            for name, (workers, threads) in CONFIGS.items():
                folder = root / f"sweep-{workers}x{threads}-{round_}"
                seconds = sweep_seconds(folder, model, data, workers, threads, options.steps)
                times[name].append(seconds)
                print(f"{name}: {seconds:.1f} s", flush=True)
    one, two = (statistics.median(times[name]) for name in CONFIGS)
    print(f"4 runs of {options.steps} steps, {os.cpu_count()} logical cores")
    print(f"1 worker x 2 threads: {one:.1f} s; 2 workers x 1 thread: {two:.1f} s")
    print(f"ratio (1 worker x 2 threads) / (2 workers x 1 thread): {one / two:.2f}")


if __name__ == "__main__":
    main()
