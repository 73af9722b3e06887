"""The claims study: its pre-registered experiments file, the verdict arithmetic on constructed
numbers, and a tiny real study (random 2-layer BERT, one claim, 2 seeds, real recipe runs in
fresh processes on the comparison engine) whose report is rendered, rendered again byte for
byte, and one of whose runs is rerun to the stored numbers."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from recipes.claims import cli
from recipes.claims.analysis import ArmResult, evaluate, metric_value
from recipes.claims.registry import (
    DEFAULT_REGISTRY,
    METRICS,
    MIN_SEEDS,
    load_registry,
    parse_registry,
)
from recipes.claims.verdict import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    UNTESTED,
    combine,
    effect_interval,
    identical_pairs,
    paired_interval,
    t_quantile,
    verdict,
    welch_interval,
)

# The claims issue 25 lists; each must have an experiment.
ISSUE_CLAIMS = {
    "transformer_golden_combo",
    "cnn_nesterov_cosine_best",
    "adabelief_order",
    "finish_with_sgd",
    "cosine_beats_step",
    "transformer_warmup",
    "clipping_high_lr",
    "fp16_eps",
    "linear_lr_scaling",
    "adagrad_lr_decays",
    "nesterov_faster",
}
# Two-sided 95% Student t quantiles t_{0.975, df} (tables; SciPy's stats.t.ppf agrees).
T_TABLE = {
    1: 12.706204736174698,
    2: 4.302652729749464,
    4: 2.7764451051977934,
    10: 2.2281388519862744,
}


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_parses_and_every_claim_is_complete():
    registry = load_registry(DEFAULT_REGISTRY)
    ids = {claim.id for claim in registry.claims}
    assert ids >= ISSUE_CLAIMS
    assert any(claim.origin == "implied" for claim in registry.claims)
    assert len(registry.seeds) >= MIN_SEEDS and registry.lr_trials >= 2
    for claim in registry.claims:
        assert claim.quote.strip() and claim.source.strip(), claim.id
        assert claim.metric in METRICS and claim.direction in ("higher", "lower"), claim.id
        assert claim.comparisons, claim.id
        for comparison in claim.comparisons:
            arm = registry.arms[comparison.arm]
            assert arm.task in registry.tasks
            if comparison.other is not None:
                other = registry.arms[comparison.other]
                assert other.task == arm.task, f"{claim.id}: arms of one comparison share a task"
    for arm in registry.arms.values():
        assert arm.title and (arm.searched or arm.fixed_lr > 0)
    # One claim spans two tasks and gets a verdict per task.
    assert {registry.arms[c.arm].task for c in registry.claim("cosine_beats_step").comparisons} == {
        "resnet",
        "vit",
    }


def test_each_tasks_arm_options_pass_the_engines_planner(tmp_path):
    """One arm per task planned by the engine (the recipe's own parser checks every option)."""
    from recipes.claims.arms import plan_arm, sweep_argv

    registry = load_registry()
    seen = set()
    for arm in registry.arms.values():
        if arm.task in seen:
            continue
        seen.add(arm.task)
        argv = sweep_argv(registry, arm, work=tmp_path, storage=f"sqlite:///{tmp_path}/s.db")
        plan, options = plan_arm(argv)
        assert plan.optimizers == [arm.optimizer] and options.study == arm.name
        assert len({t.seed for t in plan.trials}) == len(registry.seeds)
        searched = [t for t in plan.trials if t.role == "lr-search"]
        assert len(searched) == (registry.lr_trials if arm.searched else 0)
    assert seen == set(registry.tasks)


def _raw() -> dict:
    with DEFAULT_REGISTRY.open() as handle:
        return yaml.safe_load(handle)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["claims"][0].pop("quote"), "claims.transformer_golden_combo.quote: missing"),
        (
            lambda r: r["claims"][0]["comparisons"][0].update(other="bert_adam_warmup_cosin"),
            "closest: 'bert_adam_warmup_cosine'",
        ),
        (lambda r: r["defaults"].update(seeds=[42, 43]), "defaults.seeds: got [42, 43]"),
        (lambda r: r["claims"][0].update(metric="test_accuracy"), "closest: 'test_acc'"),
        (lambda r: r["claims"][0].update(direction="up"), "direction: got 'up'"),
    ],
)
def test_an_incomplete_registry_is_one_error_naming_the_field(change, message):
    raw = copy.deepcopy(_raw())
    change(raw)
    with pytest.raises(ValueError, match=None) as error:
        parse_registry(raw)
    assert message in str(error.value)


# --- verdicts on constructed numbers -------------------------------------------------------------


def test_t_quantile_matches_the_table_and_scipy():
    for df, expected in T_TABLE.items():
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-T_TABLE[4], abs=1e-9)
    try:
        from scipy import stats
    except ImportError:  # the table above is the oracle then
        return
    for df in (1, 2, 3, 5.5, 7.25, 30):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9)


def test_the_paired_interval_by_hand():
    a, b = [0.90, 0.92, 0.91], [0.88, 0.90, 0.905]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean, half = statistics.fmean(d), T_TABLE[2] * statistics.stdev(d) / math.sqrt(3)
    interval = paired_interval(a, b)
    assert (interval.effect, interval.low, interval.high) == pytest.approx(
        (mean, mean - half, mean + half), abs=1e-12
    )
    assert interval.method == "paired t" and interval.df == 2
    # Oriented for "lower is better": the same numbers, the sign flipped.
    flipped = paired_interval(a, b, orient=-1)
    assert (flipped.low, flipped.high) == pytest.approx((-interval.high, -interval.low))


def test_supported_contradicted_inconclusive():
    seeds = {42: 0.0, 43: 0.0, 44: 0.0}
    better = {42: 0.011, 43: 0.012, 44: 0.0105}  # +1.1 points, tight: supported
    worse = {s: -v for s, v in better.items()}
    noisy = {42: 0.02, 43: -0.015, 44: 0.004}  # a mean above 0 inside the noise
    assert verdict(effect_interval(better, seeds, 1)) == SUPPORTED
    assert verdict(effect_interval(worse, seeds, 1)) == CONTRADICTED
    assert verdict(effect_interval(noisy, seeds, 1)) == INCONCLUSIVE
    # "lower is better": a lower metric supports, a higher one contradicts.
    assert verdict(effect_interval(worse, seeds, -1)) == SUPPORTED
    assert verdict(effect_interval(better, seeds, -1)) == CONTRADICTED
    # Fewer than two values: no interval, never a win.
    assert verdict(effect_interval({42: 0.5}, {42: 0.1}, 1)) == INCONCLUSIVE


def test_pairing_by_seed_cancels_the_seed_to_seed_variation():
    """The same numbers: paired, a consistent +1 point beats the 5-point spread between seeds;
    with no common seeds (Welch) that spread swamps it."""
    a = {42: 0.81, 43: 0.86, 44: 0.91}
    b = {42: 0.80, 43: 0.849, 44: 0.902}
    paired = effect_interval(a, b, 1)
    assert paired.method == "paired t" and verdict(paired) == SUPPORTED
    unpaired = effect_interval(a, {s + 10: v for s, v in b.items()}, 1)
    assert unpaired.method == "Welch t" and verdict(unpaired) == INCONCLUSIVE
    va = statistics.variance(a.values()) / 3
    vb = statistics.variance(b.values()) / 3
    nu = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert unpaired.df == pytest.approx(nu)
    assert unpaired.high - unpaired.effect == pytest.approx(
        t_quantile(0.975, nu) * math.sqrt(va + vb)
    )
    assert welch_interval(list(a.values()), list(b.values())).df == pytest.approx(nu)
    try:
        from scipy import stats
    except ImportError:
        return
    low, high = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(0.95)
    assert (paired.low, paired.high) == pytest.approx((low, high), abs=1e-9)
    welch = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
    assert (unpaired.low, unpaired.high) == pytest.approx(welch.confidence_interval(0.95), abs=1e-9)


def test_one_sample_and_combined_verdicts():
    decays = {42: -2.1, 43: -2.3, 44: -1.9}  # log10 effective-LR ratios, predicted < 0
    interval = effect_interval(decays, None, -1)
    assert interval.method == "one-sample t" and verdict(interval) == SUPPORTED
    assert combine([SUPPORTED, SUPPORTED], "all") == SUPPORTED
    assert combine([SUPPORTED, INCONCLUSIVE], "all") == INCONCLUSIVE
    assert combine([SUPPORTED, CONTRADICTED], "all") == CONTRADICTED
    assert combine([INCONCLUSIVE, SUPPORTED], "any") == SUPPORTED
    assert combine([CONTRADICTED, CONTRADICTED], "any") == CONTRADICTED
    assert combine([INCONCLUSIVE, SUPPORTED], "first") == INCONCLUSIVE


def test_identical_per_seed_values_are_untested_and_a_small_difference_is_not():
    """Arms that gave the same value at every seed tested nothing: untested, not a zero-width
    'inconclusive'. One image of 2,000 (0.05 points) at one seed is a real difference and gets
    the t interval's verdict again."""
    cosine = {42: 0.8560, 43: 0.8545, 44: 0.8595}
    same = dict(cosine)
    for orient in (1, -1):
        interval = effect_interval(same, cosine, orient)
        assert interval.method == "paired t" and interval.low == interval.high == 0.0
        assert identical_pairs(same, cosine)
        assert verdict(interval, identical=identical_pairs(same, cosine)) == UNTESTED
    one_image = {**cosine, 44: cosine[44] + 0.0005}
    assert not identical_pairs(one_image, cosine)
    interval = effect_interval(one_image, cosine, 1)
    assert interval.low < 0 < interval.high
    assert verdict(interval, identical=identical_pairs(one_image, cosine)) == INCONCLUSIVE
    tight = {s: v + d for (s, v), d in zip(cosine.items(), (0.001, 0.0011, 0.0009), strict=True)}
    assert not identical_pairs(tight, cosine)
    assert verdict(effect_interval(tight, cosine, 1), identical=False) == SUPPORTED
    assert verdict(effect_interval(tight, cosine, -1), identical=False) == CONTRADICTED
    # Only a paired comparison can be identical: no common seeds (Welch) or one sample is not.
    assert not identical_pairs(same, {s + 10: v for s, v in cosine.items()})
    assert not identical_pairs(same, None)
    assert not identical_pairs({42: 0.5, 43: math.nan}, {42: 0.5, 43: math.nan})  # one pair
    # Combined: like inconclusive, never support or contradiction; untested only if all are.
    assert combine([CONTRADICTED, UNTESTED], "any") == INCONCLUSIVE
    assert combine([SUPPORTED, UNTESTED], "any") == SUPPORTED
    assert combine([SUPPORTED, UNTESTED], "all") == INCONCLUSIVE
    assert combine([UNTESTED, CONTRADICTED], "all") == CONTRADICTED
    assert combine([UNTESTED, UNTESTED], "all") == combine([UNTESTED], "any") == UNTESTED


def _study_page(values: dict[str, tuple[dict[int, float], list[str]]]) -> tuple[list, str, str]:
    """The registry's claims evaluated on constructed runs (arm -> per-seed test accuracy and the
    optimizer classes its records list), and the page and headline they render to."""
    from recipes.claims.report import _blocks, _markdown

    registry = load_registry()
    arms = {name: ArmResult(arm, registry.seeds) for name, arm in registry.arms.items()}
    for name, (per_seed, classes) in values.items():
        for seed, acc in per_seed.items():
            arms[name].runs[seed] = {
                **{"key": f"seed{seed}", "role": "compare", "lr": 1e-3, "status": "finished"},
                **{"value": acc, "test": {"test_acc": acc}, "global_step": 158},
                "optimizer_classes": classes,
            }
    results = [evaluate(claim, arms) for claim in registry.claims]
    blocks, headline = _blocks(registry, results, arms, [], {}, quick=False)
    return results, _markdown(blocks), _markdown(headline)


def test_the_report_says_in_words_why_identical_arms_are_untested():
    cosine = {42: 0.8560, 43: 0.8545, 44: 0.8595}
    half = {s: v - 0.03 for s, v in cosine.items()}
    runs = {
        "resnet_adam_cosine": (cosine, ["Adam"]),
        "resnet_adam_switch_half": (half, ["SGD"]),
        "resnet_adam_swats": (dict(cosine), ["Adam"]),
        # A comparison with no optimizer switch: the generic sentence.
        "bert_adamw_warmup_cosine": ({42: 0.9, 43: 0.91, 44: 0.92}, ["AdamW"]),
        "bert_adamw_nowarmup_cosine": ({42: 0.9, 43: 0.91, 44: 0.92}, ["AdamW"]),
    }
    results, page, headline = _study_page(runs)
    by_id = {r.claim.id: r for r in results}
    finish = by_id["finish_with_sgd"]
    assert [c.verdict for c in finish.comparisons] == [CONTRADICTED, UNTESTED]
    assert finish.verdict == INCONCLUSIVE  # "any": the untested way is no support
    assert (
        "**adam_swats > adam_cosine is untested.** resnet_adam_swats never switched optimizer: "
        "its runs used Adam only (`optimizer_classes` of their records), so it ran identically "
        "to resnet_adam_cosine: the same test accuracy at every seed (42, 43, 44)"
    ) in page
    assert "resnet_adam_switch_half" not in page.split("is untested.**")[1].split("\n")[0]
    row = next(line for line in headline.splitlines() if "[finish_with_sgd]" in line)
    assert "| inconclusive (adam_swats > adam_cosine: untested) |" in row
    assert "adam_swats > adam_cosine: none (identical runs)" in row and "+0.00 pp" not in row
    warmup = by_id["transformer_warmup"]
    assert warmup.verdict == UNTESTED
    assert (
        "**adamw_warmup_cosine > adamw_nowarmup_cosine is untested.** bert_adamw_warmup_cosine "
        "ran identically to bert_adamw_nowarmup_cosine: the same test accuracy"
    ) in page
    row = next(line for line in headline.splitlines() if "[transformer_warmup]" in line)
    assert "| untested |" in row and "none (identical runs)" in row


def test_which_commands_mean_an_optimizer_switch():
    from recipes.claims.report import _switches_optimizer

    registry = load_registry()
    meant = {n for n, a in registry.arms.items() if _switches_optimizer(a.args)}
    assert meant == {"resnet_adam_switch_half", "resnet_adam_swats"}
    assert _switches_optimizer(["--adam_to_sgd.at_fraction", "0.5"])
    assert _switches_optimizer(["--adam_to_sgd=optim_callbacks.AdamToSGD"])
    assert not _switches_optimizer(["--adam_to_sgd.min_steps", "20", "--adam_to_sgd", "null"])
    assert not _switches_optimizer(["--scheduler", "cosine", "--warmup", "0"])


def test_a_switch_arm_that_differs_a_little_keeps_the_t_interval_verdict():
    cosine = {42: 0.8560, 43: 0.8545, 44: 0.8595}
    swats = {**cosine, 43: cosine[43] + 0.0005}  # one test image of 2,000 at one seed
    runs = {
        "resnet_adam_cosine": (cosine, ["Adam"]),
        "resnet_adam_switch_half": ({s: v - 0.03 for s, v in cosine.items()}, ["SGD"]),
        "resnet_adam_swats": (swats, ["SGD"]),
    }
    results, page, headline = _study_page(runs)
    finish = next(r for r in results if r.claim.id == "finish_with_sgd")
    expected = effect_interval(swats, cosine, 1)
    swats_result = finish.comparisons[1]
    assert swats_result.verdict == verdict(expected) == INCONCLUSIVE
    assert swats_result.raw == pytest.approx((expected.effect, expected.low, expected.high))
    assert "is untested" not in page
    row = next(line for line in headline.splitlines() if "[finish_with_sgd]" in line)
    assert f"adam_swats > adam_cosine: {expected.effect * 100:+.2f} pp" in row
    assert "| inconclusive |" in row


# --- a tiny study, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tiny, tmp_path_factory):
    """``--quick --claims clipping_high_lr`` on the tiny BERT and keyword CSV: two fixed-LR
    arms x 2 seeds, 4 steps each, every run its own process."""
    model_dir, data = tiny
    out = tmp_path_factory.mktemp("claims") / "claims"
    argv = [
        *("--quick", "--claims", "clipping_high_lr", "--out", str(out)),
        *("--task-args", f"bert=--data.dataset {data} --data.model_name_or_path {model_dir}"),
        *("--task-args", "bert=--trainer.limit_train_batches 8"),
    ]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        env.delenv("WANDB_DIR", raising=False)
        cli.main(argv)
    return out


def test_the_tiny_study_reports_its_claim_from_the_stored_runs(tiny_study):
    out = tiny_study
    page = (out / "claims.md").read_text()
    assert "QUICK RUN" in page and "not evidence" in page
    records = {
        (p.parent.name, p.stem): json.loads(p.read_text())
        for p in (out / "study" / "records").glob("*/*.json")
    }
    assert len(records) == 4  # 2 arms x 2 seeds
    by_arm = {}
    for record in records.values():
        by_arm.setdefault(record["arm"], {})[record["seed"]] = metric_value(record, "test_acc")
    clip, noclip = by_arm["bert_adamw_highlr_clip"], by_arm["bert_adamw_highlr_noclip"]
    expected = effect_interval(clip, noclip, 1)
    summary = json.loads((out / "claims.json").read_text())["clipping_high_lr"]
    (comparison,) = summary["comparisons"]
    assert comparison["method"] == "paired t" and comparison["n"] == 2
    assert comparison["effect"] == pytest.approx(expected.effect)
    identical = identical_pairs(clip, noclip)
    assert summary["verdict"] == comparison["verdict"] == verdict(expected, identical=identical)
    row = next(line for line in page.splitlines() if "[clipping_high_lr]" in line)
    assert f"| {summary['verdict']} |" in row
    if identical:  # the tiny model can give both arms the same accuracy at every seed
        assert comparison["ci95"] is None and "| none (identical runs) |" in row
        assert (
            "**adamw_highlr_clip > adamw_highlr_noclip is untested.** bert_adamw_highlr_clip ran "
            "identically to bert_adamw_highlr_noclip"
        ) in page
    else:
        assert comparison["ci95"] == pytest.approx([expected.low, expected.high])
        assert f"{expected.effect * 100:+.2f} pp" in row and "is untested" not in page
    # Claims whose arms did not run say so; the page links each run's record.
    assert "| not yet run |" in page
    assert "study/records/bert_adamw_highlr_clip/adamw-lr0.001-seed42.json" in page
    assert (out / "plots" / "clipping_high_lr.svg").exists()
    html = (out / "claims.html").read_text()
    assert "clipping_high_lr" in html and "plots/clipping_high_lr.svg" in html


def test_render_only_writes_the_same_bytes(tiny_study, capsys):
    out = tiny_study
    names = ("claims.md", "claims.html", "claims.json", "headline.md", "plots/clipping_high_lr.svg")
    before = {name: (out / name).read_bytes() for name in names}
    for name in names:
        (out / name).unlink()
    cli.main(["--render-only", "--out", str(out)])
    assert {name: (out / name).read_bytes() for name in names} == before


def test_a_rerun_of_one_stored_run_matches(tiny_study, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(
            ["--rerun", "bert_adamw_highlr_noclip/adamw-lr0.001-seed43", "--out", str(tiny_study)]
        )
    assert done.value.code == 0, capsys.readouterr()
    assert "matches the stored run" in capsys.readouterr().out


def test_a_rerun_that_differs_is_reported(tiny_study):
    """The stored record is the oracle: a changed test accuracy or validation point differs."""
    from recipes.claims.rerun import compare_runs

    path = tiny_study / "study" / "records" / "bert_adamw_highlr_clip" / "adamw-lr0.001-seed43.json"
    stored = json.loads(path.read_text())
    assert compare_runs(stored, copy.deepcopy(stored)) == []
    changed = copy.deepcopy(stored)
    changed["test"]["test_acc"] += 1e-3
    changed["history"]["val_loss"][-1][1] += 1e-3
    differences = compare_runs(stored, changed)
    assert [d.split(":")[0] for d in differences] == ["test_acc", "val_loss"]


def test_bad_input_is_one_line_with_status_2(tiny_study, capsys):
    for argv, message in [
        (["--claims", "fp16_epsilon", "--render-only"], "closest: 'fp16_eps'"),
        (["--rerun", "nothing/here", "--out", str(tiny_study)], "rerun: got 'nothing/here'"),
        (["--task-args", "bertt=--x 1", "--quick", "--out", str(Path("q"))], "closest: 'bert'"),
    ]:
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
