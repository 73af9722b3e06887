"""FSDP2 against DDP, for tests/lib/test_sharded.py: ``python tests/scripts/fsdp_vs_ddp.py OUT
[CASE ...]`` (every case without names).

Two gloo processes (Lightning launches the second). Every case trains the same tiny MLP with the
same data and seeds twice, under DDP (the oracle) and under FSDP2 (``ModelParallelStrategy``,
``FSDP2Strategy``, ``fully_shard`` on each Linear and the root: uneven shards, a rank with no rows of the last
layer, a LayerNorm spread over both ranks), and records on each rank: the final full weights,
what was logged, the collectives GradientClipping issued per step, the optimizer classes and
learning rates over the steps. ``OUT/rank<r>.json`` holds ``{case: {"ddp": ..., "fsdp2": ...}}``
(the ``spike`` case adds ``without_batch``: DDP on data lacking the batch SpikeSkip skipped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from optim_callbacks import (
    AdamToSGD,
    AmpEpsilon,
    FSDP2Strategy,
    GradientClipping,
    ScheduleFreeModes,
    SpikeSkip,
)
from tests.lib.tiny import RecordingLogger, TinyRegressor, tiny_trainer

STEPS = 8  # 128 samples, 2 ranks, batch 8


class Sharded(TinyRegressor):
    """TinyRegressor, NaN loss (or a x1000 loss, ``spike_steps``) on rank 0 at the given steps;
    under FSDP2 each Linear and the root are sharded (``TinyRegressor.configure_model``).

    ``dealt``: the module deals the samples to the ranks itself, in order (rank ``r`` gets every
    second sample from ``r``; run with ``use_distributed_sampler=False``, as Lightning's sampler
    shuffles by a permutation that depends on the data's length), so samples ``16 k .. 16 k + 15``
    are global step ``k``'s batch; ``drop_samples`` (start, stop) leaves those samples out."""

    def __init__(
        self,
        nan_steps: tuple[int, ...] = (),
        nan_grad_steps: tuple[int, ...] = (),
        spike_steps: tuple[int, ...] = (),
        dealt: bool = False,
        drop_samples: tuple[int, int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)
        self.nan_grad_steps = set(nan_grad_steps)
        self.spike_steps = set(spike_steps)
        self.dealt = dealt
        self.drop_samples = drop_samples

    def train_dataloader(self):
        loader = super().train_dataloader()
        if not self.dealt:
            return loader
        start, stop = self.drop_samples or (0, 0)
        kept = [i for i in range(len(loader.dataset)) if not start <= i < stop]
        mine = kept[self.global_rank :: self.trainer.world_size]
        subset = torch.utils.data.Subset(loader.dataset, mine)
        return torch.utils.data.DataLoader(subset, batch_size=loader.batch_size, shuffle=False)

    def on_after_backward(self) -> None:
        """At ``nan_grad_steps``, one gradient element becomes NaN: the output bias, which under
        FSDP2 lies on rank 0 alone (rank 1 holds no rows of the last layer)."""
        if self.trainer.global_step in self.nan_grad_steps:
            grad = self.net[3].bias.grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            if local.numel():
                local[0] = float("nan")

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 0 and self.trainer.global_step in self.nan_steps:
            loss = loss * float("nan")
        if self.global_rank == 0 and self.trainer.global_step in self.spike_steps:
            loss = loss * 1000
        return loss


class CountedClipping(GradientClipping):
    """The real callback; each step's collectives are counted around its hook."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.collectives: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with CommDebugMode() as comm:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.collectives.append(comm.get_total_counts())


class Trace(Callback):
    """The optimizer's class and learning rates, and whether gradients reached the step."""

    def __init__(self) -> None:
        self.optimizers: list[str] = []
        self.lrs: list[list[float]] = []
        self.skipped: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizers.append(type(optimizer).__name__)
        self.lrs.append([group["lr"] for group in optimizer.param_groups])
        self.skipped.append(all(p.grad is None for p in pl_module.parameters()))


def full_weights(module) -> list[float]:
    tensors = [p.full_tensor() if isinstance(p, DTensor) else p for p in module.parameters()]
    return torch.cat([t.detach().double().flatten() for t in tensors]).tolist()


def strategy(kind: str):
    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    return FSDP2Strategy(data_parallel_size=2)


CASES = {
    "norm": dict(clipping=dict(max_norm=0.5)),
    "norm_inf": dict(clipping=dict(max_norm=0.05, norm_type=float("inf"))),
    "value": dict(clipping=dict(mode="value", max_value=0.02)),
    "agc": dict(clipping=dict(mode="agc", clip_factor=0.02, exclude=["net.3"])),
    "auto": dict(clipping=dict(mode="auto", percentile=50)),
    "nonfinite": dict(clipping=dict(max_norm=0.5), nan_steps=(2, 5)),
    "nonfinite_inf": dict(
        clipping=dict(max_norm=0.05, norm_type=float("inf")), nan_grad_steps=(2, 5)
    ),
    "stop": dict(
        clipping=dict(max_norm=0.5, max_consecutive_nonfinite=2), nan_steps=tuple(range(3, 99))
    ),
    # SpikeSkip (before the clipping) skips step 5, whose loss is x1000 on rank 0 only; a
    # constant LR and data dealt in order, so the run without that batch (below) sees the
    # other batches in the same order at the same LR.
    "spike": dict(
        spike=dict(window=8, warmup=4, max_skip_fraction=0.5),
        spike_steps=(5,),
        clipping=dict(max_norm=0.5),
        scheduler="constant",
        dealt=True,
        trainer=dict(use_distributed_sampler=False),
    ),
    "adam_to_sgd": dict(
        switch=dict(at_fraction=0.25, momentum=0.9, momentum_init="adam"),
        trainer=dict(max_epochs=2, max_steps=-1),
    ),
    "swats": dict(switch=dict(epsilon=0.5, min_steps=2)),
    # The registry default: the compiled update, on the local shards under FSDP2.
    "adabelief": dict(optimizer="adabelief"),
    "rmsprop_foreach": dict(optimizer="rmsprop", optimizer_options={"impl": "foreach"}),
    # Newer entries, compiled on the local shards; schedule-free switching on shards too.
    "lion": dict(optimizer="lion"),
    "schedule_free_adamw": dict(optimizer="schedule_free_adamw", scheduler="constant"),
    "amp_epsilon": dict(trainer=dict(precision="16-true"), optimizer_options={"impl": "foreach"}),
    # Per-tensor reductions (LAMB's trust ratio, Adafactor's column means and RMS terms) over
    # the whole tensor, in every implementation, with 7 hidden units: rows split 4/3, and the
    # output layer's one row on rank 0 alone. Two epochs for the compiled ones, which resume.
    **{
        f"{name}{suffix}": dict(optimizer=name, hidden=7, **extra)
        for name in ("lamb", "adafactor")
        for suffix, extra in (
            ("", dict(trainer=dict(max_epochs=2, max_steps=-1))),
            ("_foreach", dict(optimizer_options={"impl": "foreach"})),
            ("_for_loop", dict(optimizer_options={"impl": "for-loop"})),
        )
    },
}
PER_TENSOR_NORMS = ("lamb", "adafactor")


def run_case(
    name: str, kind: str, out: Path, ckpt_path: str | None = None, tag: str = "", **overrides
) -> dict:
    case = {**CASES[name], **overrides}
    folder = out / name / f"{kind}{tag}"
    torch.manual_seed(0)
    module = Sharded(
        nan_steps=case.get("nan_steps", ()),
        nan_grad_steps=case.get("nan_grad_steps", ()),
        spike_steps=case.get("spike_steps", ()),
        dealt=case.get("dealt", False),
        drop_samples=case.get("drop_samples"),
        optimizer=case.get("optimizer", "adam"),
        lr=1e-2,
        scheduler=case.get("scheduler", "cosine"),
        samples=128,
        batch_size=8,
        optimizer_options=case.get("optimizer_options"),
        hidden=case.get("hidden", 32),
    )
    clipping = CountedClipping(**case["clipping"]) if "clipping" in case else None
    trace = Trace()
    logger = RecordingLogger()
    spike = SpikeSkip(**case["spike"]) if "spike" in case else None
    callbacks = [
        c for c in (spike, clipping, AmpEpsilon(), ScheduleFreeModes(), trace) if c is not None
    ]
    if "switch" in case:
        callbacks.insert(0, AdamToSGD(**case["switch"]))
    checkpoints = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True, save_top_k=-1)
    trainer = tiny_trainer(
        folder,
        devices=2,
        strategy=strategy(kind),
        callbacks=[*callbacks, checkpoints],
        enable_checkpointing=True,
        logger=logger,
        log_every_n_steps=1,
        **{"max_steps": STEPS, **case.get("trainer", {})},
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    rows = [(step, m) for step, m in logger.rows if any(k.startswith("grad_clip/") for k in m)]
    return {
        "global_step": trainer.global_step,
        "weights": full_weights(module),
        "logged": [{k: v for k, v in m.items() if k.startswith("grad_clip/")} for _, m in rows],
        "collectives": clipping.collectives if clipping else [],
        "optimizers": trace.optimizers,
        "lrs": trace.lrs,
        "skipped": trace.skipped,
        "stop_checkpoint": clipping.stop_checkpoint_path if clipping else None,
        "nonfinite_steps": clipping.nonfinite_steps if clipping else 0,
        "spike_events": [[e["step"], e["rank"], e["spiked"]] for e in spike.events]
        if spike
        else [],
        "last_checkpoint": checkpoints.last_model_path,
        "eps": sorted({group.get("eps", 0.0) for group in trainer.optimizers[0].param_groups}),
        # The compiled update ran on every step (a failed compile would say why here).
        "compiled": bool(trainer.optimizers[0].defaults.get("fused"))
        and getattr(trainer.optimizers[0], "compile_failure", "not compiled") is None,
        "state_dtype": str(next(iter(trainer.optimizers[0].state.values()))["exp_avg"].dtype)
        if "exp_avg" in next(iter(trainer.optimizers[0].state.values()), {})
        else None,
    }


def main(out: Path, only: list[str]) -> None:
    """Every case (or the cases named in ``only``) under both strategies, and the resumes."""
    results: dict[str, dict] = {}
    for name in only or CASES:
        results[name] = {kind: run_case(name, kind, out) for kind in ("ddp", "fsdp2")}
    # Resume each compiled per-tensor-norm optimizer from its end of epoch 0 (step 8): the
    # sharded state (Adafactor's replicated column factors too) goes through the checkpoint.
    for name in PER_TENSOR_NORMS:
        if name in results:
            mid = str(out / name / "fsdp2" / "ckpt" / "epoch=0-step=8.ckpt")
            results[name]["resumed"] = run_case(name, "fsdp2", out, ckpt_path=mid, tag="-resumed")
    # The oracle of the skipped spike: DDP on data that lacks step 5's 16 samples, no spike.
    if "spike" in results:
        results["spike"]["without_batch"] = run_case(
            "spike", "ddp", out, tag="-without", spike_steps=(), drop_samples=(80, 96)
        )
    if only:
        (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results))
        return
    # The stop checkpoint (a distributed-checkpoint folder) loads and training goes on.
    stop = results["stop"]["fsdp2"]["stop_checkpoint"]
    results["stop"]["resumed"] = run_case(
        "stop", "fsdp2", out, ckpt_path=stop, tag="-resumed", nan_steps=()
    )
    # Resume after the switch to SGD (step 4) from the end of the first epoch (step 8).
    after_switch = str(out / "adam_to_sgd" / "fsdp2" / "ckpt" / "epoch=0-step=8.ckpt")
    results["adam_to_sgd"]["resumed"] = run_case(
        "adam_to_sgd", "fsdp2", out, ckpt_path=after_switch, tag="-resumed"
    )
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
