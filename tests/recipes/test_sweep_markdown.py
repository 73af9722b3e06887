"""The sweep report's words for results with no winner or no target."""

from __future__ import annotations

import math
from pathlib import Path

from recipes.sweep.markdown import claims_table, optimizer_table, verdict
from recipes.sweep.summary import AVERAGED, OptimizerSummary


def _summary(optimizer: str, test_acc: float, steps: float = math.nan) -> OptimizerSummary:
    mean = dict.fromkeys(AVERAGED, 1.0) | {"test_acc": test_acc, "steps_to_target": steps}
    std = dict.fromkeys([*AVERAGED, "steps_to_target"], 0.0)
    reached = 0 if math.isnan(steps) else 1
    return OptimizerSummary(optimizer, 1e-3, "preset", 1, 0, mean, std, reached)


def test_equal_accuracies_are_a_tie_not_a_winner():
    text = verdict([_summary("adamw", 0.75), _summary("sgd", 0.75)], target=0.7)
    assert text.startswith("**Tie: adamw, sgd**: test accuracy 0.7500 each")
    assert "Winner" not in text and "ahead" not in text


def test_a_real_gap_still_names_the_winner():
    text = verdict([_summary("adamw", 0.80), _summary("sgd", 0.75)], target=0.7)
    assert text.startswith("**Winner: adamw** (lr 0.001): test accuracy 0.8000")
    assert "+0.0500 ahead of sgd (0.7500)" in text


def test_no_validation_means_no_nan_label():
    summaries = [_summary("adamw", 0.8), _summary("sgd", 0.7)]
    texts = [
        optimizer_table(summaries, math.nan, "RSS"),
        verdict(summaries, math.nan),
        claims_table(summaries, math.nan),
    ]
    assert "steps to target (no validation ran)" in texts[0]
    assert all("nan" not in text.lower() for text in texts), texts


def test_the_report_page_shows_html_in_the_report_as_text(tmp_path):
    from recipes.pages.sweep_page import write_sweep_page

    report = "# Optimizer comparison: x\n\nerror: got <script>alert(1)</script> and <b>bold</b>\n"
    page = write_sweep_page(tmp_path, report).read_text()
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<title>Optimizer comparison: x</title>" in page


def test_the_lr_search_table_marks_pruned_runs_the_choice_and_the_edge():
    from recipes.sweep.markdown import lr_search_table
    from recipes.sweep.summary import RunSummary

    def run(lr: float, acc: float, status: str = "finished") -> RunSummary:
        return RunSummary(
            f"sgd-lr{lr:g}-seed42", "sgd", lr, "", 42, status, final_val_acc=acc,
            final_val_loss=1.0, pruned_at_step=6 if status == "pruned" else None,
        )  # fmt: skip

    search = {"sgd": {"lrs": [0.1, 0.03, 1.0], "low": 0.01, "high": 1.0, "kind": "log-uniform"}}
    runs = [run(0.1, 0.8), run(0.03, 0.7), run(1.0, 0.3, "pruned")]
    text = lr_search_table(search, runs, {"sgd": 0.1})
    assert "| sgd | 0.1 | 0.8000 | 1.0000 | finished | **yes** |" in text
    assert "| sgd | 1 | 0.3000 | 1.0000 | pruned at step 6 |  |" in text
    assert "sgd: 3 trials, log-uniform in [0.01, 1]" in text
    assert "at the edge" not in text  # 0.1 lies between 0.03 and 1
    assert "at the edge" in lr_search_table(search, runs, {"sgd": 0.03})


def test_storage_urls_never_show_a_password():
    from recipes.sweep.storage import dashboard_command, masked_url, storage_url

    url = storage_url("postgresql://sweep:pa55@db:5432/sweeps", Path("."))
    assert url == "postgresql+psycopg://sweep:pa55@db:5432/sweeps"  # psycopg 3
    assert masked_url(url) == "postgresql+psycopg://sweep:***@db:5432/sweeps"
    assert dashboard_command(url) == "optuna-dashboard postgresql+psycopg://sweep@db:5432/sweeps"
    assert masked_url("postgresql://sweep@db/sweeps") == "postgresql://sweep@db/sweeps"
    assert storage_url(None, Path("out")) == f"sqlite:///{Path('out/study.db').resolve()}"
