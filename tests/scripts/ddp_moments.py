"""Two-process DDP run of MomentStatistics (run by tests/lib/test_moment_stats.py, not collected).

Usage: ``python tests/scripts/ddp_moments.py OUT_DIR``. Each rank writes ``rank<r>.json``: the
rows its logger received from the callback (a logger that records on every rank), the statistics
computed directly from its own replicated optimizer state, and whether wandb was imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from optim_callbacks import MomentStatistics
from tests.lib.test_moment_stats import Recorder, expected_statistics
from tests.lib.tiny import RecordingLogger, TinyRegressor, tiny_trainer


def main(out_dir: Path) -> None:
    logger, recorder = RecordingLogger(), Recorder()
    trainer = tiny_trainer(
        out_dir,
        strategy="ddp",
        devices=2,
        max_steps=6,
        logger=logger,
        callbacks=[MomentStatistics(every_n_steps=3), recorder],
    )
    # A 64x96 first layer: larger than the 1024 elements the callback once sampled.
    trainer.fit(TinyRegressor(optimizer="adam", features=64, hidden=96))
    rows = [
        {"step": step, "metrics": metrics}
        for step, metrics in logger.rows
        if any(k.startswith("moments") for k in metrics)
    ]
    result = {
        "rank": trainer.global_rank,
        "rows": rows,
        "expected": {
            str(step): expected_statistics(recorder.records[step], "adam") for step in (2, 5)
        },
        "wandb_imported": "wandb" in sys.modules,
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
