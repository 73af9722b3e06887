"""The sweep report's words for results with no winner or no target."""

from __future__ import annotations

import math

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
