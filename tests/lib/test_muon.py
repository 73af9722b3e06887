"""MuonWithAdamW: groups added during a fit (an unfreezing callback's), the AdamW part's weight
decay from the registry, torch's ``fused=True`` check, the Muon step against
``torch.optim.Muon``, and Muon under FSDP2 and DDP (``tests/scripts/fsdp_muon.py``) against
single-process ``torch.optim.Muon`` / ``AdamW`` fed the same gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from optim_callbacks import MuonWithAdamW, build_optimizer
from optim_callbacks.distributed_muon import newton_schulz, shard_sizes
from tests.lib.tiny import TinyRegressor, tiny_trainer


# ------------------------------------------------------------------- groups added later (defect 4)
def _twin_step(models, optimizers, x):
    for model, opts in zip(models, optimizers, strict=True):
        for opt in opts:
            opt.zero_grad()
        model(x).pow(2).mean().backward()
        for opt in opts:
            opt.step()


def test_an_added_group_is_routed_to_muon_and_adamw_and_steps_like_torch():
    """A group without ``use_muon`` added after construction: its matrix steps exactly as
    ``torch.optim.Muon``, its bias exactly as ``torch.optim.AdamW``, with the optimizer's options
    for each part and the group's own ``lr``; both are in the state dict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    ours = MuonWithAdamW([model[2].weight], lr=0.02, weight_decay=0.1, adamw_weight_decay=0.01)
    muon = torch.optim.Muon([twin[2].weight], lr=0.02, weight_decay=0.1)
    x = torch.randn(16, 6)
    _twin_step((model, twin), ([ours], [muon]), x)
    ours.add_param_group({"params": [model[0].weight, model[0].bias, model[2].bias], "lr": 0.01})
    muon.add_param_group({"params": [twin[0].weight], "lr": 0.01})
    adamw = torch.optim.AdamW(
        [twin[0].bias, twin[2].bias], lr=0.01, betas=(0.9, 0.95), weight_decay=0.01
    )
    assert [(g["use_muon"], len(g["params"])) for g in ours.param_groups] == [
        (True, 1),
        (True, 1),
        (False, 2),
    ]
    added_adamw = ours.param_groups[2]
    assert (added_adamw["lr"], added_adamw["weight_decay"], added_adamw["betas"]) == (
        0.01,
        0.01,
        (0.9, 0.95),
    )
    for _ in range(5):
        _twin_step((model, twin), ([ours], [muon, adamw]), x)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), name
    saved = ours.state_dict()
    assert len(saved["param_groups"]) == 3
    assert {k for s in saved["state"].values() for k in s} == {
        "momentum_buffer",
        "step",
        "exp_avg",
        "exp_avg_sq",
    }


def test_an_added_group_keeps_its_flag_and_a_vector_flagged_muon_is_refused():
    matrix, other, bias = (nn.Parameter(torch.randn(4, 3)) for _ in range(2)), None, None
    matrix, other = list(matrix)
    bias = nn.Parameter(torch.randn(3))
    optimizer = MuonWithAdamW([matrix])
    optimizer.add_param_group({"params": [other], "use_muon": False})
    assert [g["use_muon"] for g in optimizer.param_groups] == [True, False]
    assert optimizer.param_groups[1]["lr"] == 3e-4  # the AdamW part's default, not Muon's
    with pytest.raises(ValueError, match=r"^use_muon: got True for a parameter of shape \(3,\)"):
        optimizer.add_param_group({"params": [bias], "use_muon": True})
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [matrix]})


class UnfreezeFirstLayer(BaseFinetuning):
    """Lightning's unfreezing callback: the first Linear is frozen, then added in epoch 1."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen: dict[str, torch.Tensor] = {}

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module, current_epoch, optimizer):
        if current_epoch == 1:
            self.frozen = {n: p.detach().clone() for n, p in pl_module.net[0].named_parameters()}
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)


def test_a_layer_unfrozen_mid_fit_trains_with_muon_and_adamw(tmp_path):
    torch.manual_seed(0)
    module = TinyRegressor(optimizer="muon", lr=0.02, samples=64, scheduler=None)
    start = {n: p.detach().clone() for n, p in module.net[0].named_parameters()}
    unfreeze = UnfreezeFirstLayer()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[unfreeze])
    trainer.fit(module)
    optimizer = trainer.optimizers[0]
    weight, bias = module.net[0].weight, module.net[0].bias
    assert all(torch.equal(unfreeze.frozen[n], start[n]) for n in start)  # frozen in epoch 0
    assert not torch.equal(weight, start["weight"]) and not torch.equal(bias, start["bias"])
    owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert owner[id(weight)]["use_muon"] is True and owner[id(bias)]["use_muon"] is False
    assert owner[id(weight)]["lr"] == owner[id(bias)]["lr"] == pytest.approx(0.002)  # 0.02 / 10
    assert owner[id(bias)]["betas"] == (0.9, 0.95)  # the AdamW part's options
    assert optimizer.state[weight]["momentum_buffer"].abs().sum() > 0
    assert optimizer.state[bias]["step"] == 4  # the four steps of epoch 1
    # what Lightning saves holds the new groups and their state, and loads into a fresh copy
    saved = optimizer.state_dict()
    fresh = MuonWithAdamW(copy.deepcopy(optimizer.param_groups))
    fresh.load_state_dict(saved)
    assert [g["use_muon"] for g in fresh.param_groups] == [
        g["use_muon"] for g in optimizer.param_groups
    ]
    assert len(saved["state"]) == sum(len(g["params"]) for g in optimizer.param_groups)


# ------------------------------------------------------------------ AdamW weight decay (defect 5)
def _model() -> nn.Module:
    return nn.ModuleDict(
        {
            "embed": nn.Embedding(11, 8),
            "layers": nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
            "classifier": nn.Linear(8, 3),
        }
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [({"adamw_weight_decay": 0.0}, 0.0), ({}, 0.0), ({"adamw_weight_decay": 0.05}, 0.05)],
)
def test_the_adamw_part_gets_adamw_weight_decay(given, expected):
    optimizer = build_optimizer("muon", _model(), **given)
    decays = {
        (g["use_muon"], g["name"]): g["weight_decay"] for g in optimizer.param_groups if g["params"]
    }
    assert decays == {
        (True, "decay"): 0.1,  # Muon's
        (False, "decay"): expected,  # embedding and classifier weights
        (False, "no_decay"): 0.0,  # biases and the norm
    }


# ------------------------------------------------------------------------------ fused=True (torch)
@pytest.mark.parametrize("which", ["matrix", "vector"])
def test_fused_on_a_meta_parameter_raises_torchs_error(which):
    """Muon has no fused kernel; with ``fused=True`` (the AdamW part's kernels) the matrices are
    checked as torch checks them, with torch's words."""
    param = nn.Parameter(torch.zeros((4, 3) if which == "matrix" else (3,), device="meta"))
    param.grad = torch.zeros_like(param)
    ours = MuonWithAdamW([param], fused=True)
    with pytest.raises(RuntimeError) as raised:
        ours.step()
    plain = nn.Parameter(torch.zeros(param.shape, device="meta"))
    plain.grad = torch.zeros_like(plain)
    with pytest.raises(RuntimeError) as expected:
        torch.optim.AdamW([plain], fused=True).step()
    assert str(raised.value) == str(expected.value)
    assert str(raised.value).startswith(
        "`fused=True` requires all the params to be floating point Tensors of supported devices"
    )


# ------------------------------------------------------------------------ the step against torch
@pytest.mark.parametrize(
    "options",
    [
        {"nesterov": False, "weight_decay": 0.0},
        {"adjust_lr_fn": "match_rms_adamw", "momentum": 0.9},
        {"ns_steps": 3, "adjust_lr_fn": "original"},
    ],
)
def test_the_muon_step_equals_torchs_bit_for_bit(options):
    torch.manual_seed(0)
    shapes = [(9, 4), (4, 9), (1, 5), (6, 6)]  # tall, wide, one row, square
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    a = MuonWithAdamW(ours, lr=0.05, **options)
    b = torch.optim.Muon(theirs, lr=0.05, **{"weight_decay": 0.1, **options})
    for _ in range(4):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
    assert a.orthogonalized == len(shapes)


def test_newton_schulz_leaves_its_input_alone():
    matrix = torch.randn(5, 3, dtype=torch.bfloat16)
    before = matrix.clone()
    out = newton_schulz(matrix)
    assert torch.equal(matrix, before) and out.shape == (5, 3) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(("length", "world"), [(768, 3), (5, 2), (1, 2), (5, 4), (0, 2), (7, 3)])
def test_shard_sizes_are_torch_chunk_lengths(length, world):
    chunks = [len(c) for c in torch.arange(length).chunk(world)]
    assert shard_sizes(length, world) == chunks + [0] * (world - len(chunks))


# ----------------------------------------------------------------------------- FSDP2 and DDP
def _replay(
    run: dict, momentum: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Single-process ``torch.optim.Muon`` (matrices) and ``AdamW`` (the rest), one optimizer
    per parameter with its group's options, fed the run's recorded full gradients and
    learning rates from its recorded start: the final weights and momentum buffers. With
    ``momentum`` (a resumed run's loaded buffers), the Muon matrices alone, from it."""
    params, optimizers = {}, {}
    for name, value in run["start"].items():
        g = run["groups"][name]
        if momentum is not None and not g["use_muon"]:
            continue
        p = params[name] = nn.Parameter(torch.tensor(value))
        if g["use_muon"]:
            optimizers[name] = torch.optim.Muon(
                [p], weight_decay=g["weight_decay"], momentum=g["momentum"], nesterov=g["nesterov"]
            )
            if momentum is not None:
                optimizers[name].state[p]["momentum_buffer"] = torch.tensor(momentum[name])
        else:
            optimizers[name] = torch.optim.AdamW(
                [p], betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"]
            )
    for grads, lrs in zip(run["grads"], run["lrs"], strict=True):
        for name, p in params.items():
            p.grad = torch.tensor(grads[name])
            optimizers[name].param_groups[0]["lr"] = lrs[name]
            optimizers[name].step()
    buffers = {
        n: o.state[params[n]]["momentum_buffer"]
        for n, o in optimizers.items()
        if "momentum_buffer" in o.state[params[n]]
    }
    return {n: p.detach() for n, p in params.items()}, buffers


def _max_difference(ours: dict, oracle: dict) -> float:
    assert ours.keys() == oracle.keys() and ours
    return max((torch.tensor(ours[n]) - oracle[n]).abs().max().item() for n in ours)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, two_processes) -> list[dict]:
    return two_processes("fsdp_muon.py", tmp_path_factory.mktemp("muon"), timeout=400)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_distributed_muon_equals_single_process_muon(sharded, kind):
    """Three Muon matrices, 32 x 16 (tall), 5 x 32 (shards of 3 and 2 rows) and 1 x 5 (rank 1
    holds no row), eight steps: the weights and momentum equal single-process torch's within
    1e-5, every rank ends with the same model, and each rank orthogonalized only its share
    (matrices 0 and 2 on rank 0, matrix 1 on rank 1)."""
    run = sharded[0][kind]
    assert run["global_step"] == 8 and len(run["grads"]) == 8
    assert {n for n, g in run["groups"].items() if g["use_muon"]} == {
        "net.0.weight",
        "net.3.weight",
        "net.5.weight",
    }
    weights, momentum = _replay(run)
    assert _max_difference(run["end"], weights) <= 1e-5
    assert _max_difference(run["momentum_at_end"], momentum) <= 1e-5
    assert sharded[1][kind]["end"] == run["end"]
    assert run["orthogonalized"] == [2] * 8
    assert sharded[1][kind]["orthogonalized"] == [1] * 8
    if kind == "fsdp2":
        assert run["state_types"] == ["DTensor"]  # the momentum stays sharded


@pytest.mark.slow
@pytest.mark.ddp
def test_fsdp2_checkpoints_carry_the_muon_momentum(sharded):
    """The distributed checkpoint of step 4 holds every rank's momentum shards: the resumed run
    starts from the momentum the first run had at step 4, and its matrices then move as
    single-process Muon moves them from that momentum."""
    first, resumed = sharded[0]["fsdp2"], sharded[0]["fsdp2_resumed"]
    loaded = resumed["momentum_at_start"]
    assert loaded.keys() == {"net.0.weight", "net.3.weight", "net.5.weight"}
    assert loaded == first["momentum_at_4"]
    assert resumed["global_step"] == 8 and len(resumed["grads"]) == 4
    weights, momentum = _replay(resumed, momentum=loaded)
    assert _max_difference({n: resumed["end"][n] for n in weights}, weights) <= 1e-5
    assert _max_difference(resumed["momentum_at_end"], momentum) <= 1e-5
    # without the loaded momentum the matrices would have moved elsewhere
    zero = {n: torch.zeros_like(torch.tensor(v)).tolist() for n, v in loaded.items()}
    assert (
        _max_difference({n: resumed["end"][n] for n in weights}, _replay(resumed, zero)[0]) > 1e-3
    )
