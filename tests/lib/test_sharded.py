"""The callbacks under FSDP2 against the DDP oracle: one two-process gloo job
(``tests/scripts/fsdp_vs_ddp.py``) trains every case under both strategies; the tests read what
each rank recorded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

CLIPPING_MODES = ("norm", "norm_inf", "value", "agc", "auto")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, two_processes) -> list[dict]:
    return two_processes("fsdp_vs_ddp.py", tmp_path_factory.mktemp("fsdp"), timeout=400)


def _max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "case",
    [
        *CLIPPING_MODES,
        "nonfinite",
        "adabelief",
        "rmsprop_foreach",
        "lion",
        "schedule_free_adamw",
        "amp_epsilon",
    ],
)
def test_fsdp2_ends_with_the_weights_of_ddp(ranks, case):
    ddp, fsdp2 = ranks[0][case]["ddp"], ranks[0][case]["fsdp2"]
    assert fsdp2["global_step"] == ddp["global_step"] == 8
    assert _max_difference(fsdp2["weights"], ddp["weights"]) <= 1e-6
    assert ranks[1][case]["fsdp2"]["weights"] == fsdp2["weights"]  # one model, gathered
    if case in ("adabelief", "lion", "schedule_free_adamw"):  # compiled, on the local shards
        assert fsdp2["compiled"] and ddp["compiled"]


@pytest.mark.parametrize("case", CLIPPING_MODES)
def test_fsdp2_logs_the_clipping_values_of_ddp(ranks, case):
    ddp, fsdp2 = ranks[0][case]["ddp"]["logged"], ranks[0][case]["fsdp2"]["logged"]
    assert len(fsdp2) == len(ddp) == 8
    for expected, actual in zip(ddp, fsdp2, strict=True):
        assert expected.keys() == actual.keys()
        for key, value in expected.items():
            assert math.isclose(actual[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, actual)
    if case != "auto":
        assert any(row["grad_clip/coefficient"] < 1.0 for row in fsdp2)  # it did clip
    # every rank logs the same global values (rank zero's reach the logger)
    assert ranks[1][case]["fsdp2"]["logged"] == fsdp2


@pytest.mark.parametrize(
    ("case", "per_step"), [("norm", 1), ("norm_inf", 1), ("auto", 1), ("value", 3), ("agc", 4)]
)
def test_collectives_per_step(ranks, case, per_step):
    """norm/auto: the norm (one all-reduce). value: the norm, the largest element and the norm
    after clamping. agc: the norm, the 1-D units spread over both ranks, whether any rank
    clipped, the norm after. DDP: none (its gradients are already all-reduced)."""
    assert ranks[0][case]["fsdp2"]["collectives"] == [per_step] * 8
    assert ranks[0][case]["ddp"]["collectives"] == [0] * 8


@pytest.mark.parametrize("case", ["nonfinite", "nonfinite_inf"])
def test_a_nonfinite_step_on_one_rank_is_skipped_on_both(ranks, case):
    """``nonfinite``: rank 0's loss is NaN. ``nonfinite_inf``: one element of the shard only rank
    0 holds is NaN, under the inf-norm (a MAX all-reduce, which must not drop the NaN)."""
    for rank in ranks:
        for kind in ("ddp", "fsdp2"):
            run = rank[case][kind]
            assert [i for i, skipped in enumerate(run["skipped"]) if skipped] == [2, 5]
            assert run["nonfinite_steps"] == 2
    ddp, fsdp2 = ranks[0][case]["ddp"]["weights"], ranks[0][case]["fsdp2"]["weights"]
    assert _max_difference(fsdp2, ddp) <= 1e-6


def test_nonfinite_stop_writes_a_sharded_checkpoint_that_resumes(ranks):
    run = ranks[0]["stop"]["fsdp2"]
    assert run["global_step"] == 5  # NaN from step 3: two in a row stop after step 4
    assert (Path(run["stop_checkpoint"]) / ".metadata").is_file()  # a distributed checkpoint
    assert ranks[0]["stop"]["resumed"]["global_step"] == 8
    assert _max_difference(run["weights"], ranks[0]["stop"]["ddp"]["weights"]) <= 1e-6


@pytest.mark.parametrize("case", ["adam_to_sgd", "swats"])
def test_adam_to_sgd_switches_at_the_ddp_step_with_the_ddp_lrs(ranks, case):
    ddp, fsdp2 = ranks[0][case]["ddp"], ranks[0][case]["fsdp2"]
    assert "SGD" in ddp["optimizers"]
    assert fsdp2["optimizers"].index("SGD") == ddp["optimizers"].index("SGD")
    # The SWATS estimate sums over shards under FSDP2 and over whole tensors under DDP: the
    # same numbers added in another order, equal to the last bit or two.
    assert len(fsdp2["lrs"]) == len(ddp["lrs"])
    for sharded, replicated in zip(fsdp2["lrs"], ddp["lrs"], strict=True):
        assert sharded == pytest.approx(replicated, rel=1e-12, abs=0)
    assert _max_difference(fsdp2["weights"], ddp["weights"]) <= 1e-6
    assert ranks[1][case]["fsdp2"]["optimizers"] == fsdp2["optimizers"]


def test_an_fsdp2_resume_after_the_switch_continues_bit_for_bit(ranks):
    straight, resumed = ranks[0]["adam_to_sgd"]["fsdp2"], ranks[0]["adam_to_sgd"]["resumed"]
    assert straight["optimizers"].index("SGD") == 4  # switched in epoch 0, resumed at step 8
    assert resumed["global_step"] == straight["global_step"] == 16
    assert set(resumed["optimizers"]) == {"SGD"}
    assert resumed["lrs"] == straight["lrs"][8:]
    assert resumed["weights"] == straight["weights"]


def test_amp_epsilon_decides_from_the_sharded_float16_state(ranks):
    for rank in ranks:
        for kind in ("ddp", "fsdp2"):
            run = rank["amp_epsilon"][kind]
            assert run["state_dtype"] == "torch.float16" and run["eps"] == [1e-4]


PER_TENSOR_NORMS = [f"{n}{s}" for n in ("lamb", "adafactor") for s in ("", "_foreach", "_for_loop")]


@pytest.mark.parametrize("case", PER_TENSOR_NORMS)
def test_per_tensor_reductions_under_fsdp2_are_over_whole_tensors(ranks, case):
    """LAMB's trust ratio and Adafactor's column means and RMS terms, every implementation
    (compiled, foreach, for-loop), on rows split 4/3 and a layer whose one row rank 1 lacks:
    FSDP2 ends where DDP does. Before the fix the trust ratio came from each rank's shard
    (LAMB 0.03 off) and the for-loop LAMB and every Adafactor path crashed."""
    ddp, fsdp2 = ranks[0][case]["ddp"], ranks[0][case]["fsdp2"]
    compiled = "_" not in case
    assert fsdp2["global_step"] == ddp["global_step"] == (16 if compiled else 8)
    assert _max_difference(fsdp2["weights"], ddp["weights"]) <= 1e-5
    assert ranks[1][case]["fsdp2"]["weights"] == fsdp2["weights"]
    assert fsdp2["compiled"] is ddp["compiled"] is compiled


@pytest.mark.parametrize("case", ["lamb", "adafactor"])
def test_per_tensor_norm_optimizers_resume_from_a_sharded_checkpoint(ranks, case):
    """Resumed at step 8 from the distributed checkpoint (Adafactor's replicated column
    factors included), the run ends bit for bit where the uninterrupted one does."""
    straight, resumed = ranks[0][case]["fsdp2"], ranks[0][case]["resumed"]
    assert resumed["global_step"] == straight["global_step"] == 16
    assert resumed["weights"] == straight["weights"]
    assert ranks[1][case]["resumed"]["weights"] == resumed["weights"]


def test_a_spike_on_one_rank_is_skipped_on_both_as_if_its_batch_was_never_seen(ranks):
    """SpikeSkip under FSDP2: rank 0's loss is x1000 at step 5 only; both ranks skip that step
    (the gathered losses name rank 0) and end with the weights of a DDP run whose data lacks
    step 5's 16 samples (bit for bit under DDP, FSDP2 within its usual 1e-6). GradientClipping,
    after SpikeSkip, reuses the norm SpikeSkip computed: no collective of its own."""
    oracle = ranks[0]["spike"]["without_batch"]
    assert oracle["global_step"] == 7 and not any(oracle["skipped"])
    for rank in ranks:
        for kind in ("ddp", "fsdp2"):
            run = rank["spike"][kind]
            assert run["global_step"] == 8
            assert [i for i, skipped in enumerate(run["skipped"]) if skipped] == [5]
            assert run["spike_events"] == [[5, 0, ["loss", "grad_norm"]]]
    assert ranks[0]["spike"]["ddp"]["weights"] == oracle["weights"]
    assert _max_difference(ranks[0]["spike"]["fsdp2"]["weights"], oracle["weights"]) <= 1e-6
    assert ranks[1]["spike"]["fsdp2"]["weights"] == ranks[0]["spike"]["fsdp2"]["weights"]
    assert ranks[0]["spike"]["fsdp2"]["collectives"] == [0] * 8
