"""Training health in words: rules that read what the callbacks already measured and say, once
per cause and in one line with the numbers, what they see, the likely cause and what to try.

The inputs are what the run already holds (no pass over the parameters):
:class:`~optim_callbacks.MomentStatistics`' per-layer history
(:class:`~optim_callbacks.MomentHistory`), :class:`~optim_callbacks.GradientClipping`'s counters
and pre-clip norms, :class:`~optim_callbacks.SpikeSkip`'s events, the optimizer's groups and
state dtypes, and the first steps' losses. :func:`diagnose` applies every rule to a
:class:`HealthInputs`; :class:`TrainingFindings` gathers the inputs during a fit and reports the
findings at its end (log lines, :attr:`TrainingFindings.findings` for run pages, a W&B table
and, where W&B is online, a run alert).

Each rule's docstring names its threshold and where it comes from. The thresholds are chosen
not to cry wolf: a finding needs the condition at most logged steps, not at one.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from optim_callbacks.callbacks.clipping import GradientClipping
from optim_callbacks.callbacks.moment_stats import MomentStatistics
from optim_callbacks.callbacks.spike_skip import SpikeSkip
from optim_callbacks.moment_history import MomentHistory
from optim_callbacks.validation import check_at_least

__all__ = ["RULES", "Finding", "HealthInputs", "TrainingFindings", "diagnose"]

EPS_SHARE = 0.05  # share of a layer's elements with sqrt(v) < eps
UPDATE_RATIO_HIGH = 1e-2
UPDATE_RATIO_LOW = 1e-6
CLIP_SHARE = 0.8
CLIP_COEFFICIENT = 0.5
ADAGRAD_DECAY = 1e-2  # two orders of magnitude
LOSS_STEPS = 50  # the first steps whose losses are kept
LOSS_MIN_STEPS = 20
LOSS_FLAT = 0.01  # relative change of the loss below which it "did not move"
FP16_SMALLEST = 2.0**-24  # the smallest float16 subnormal: a smaller eps rounds to 0


@dataclass(frozen=True)
class Finding:
    """One finding: ``rule`` (its name), what is ``seen`` (with numbers), the likely ``cause``
    and what to ``try_``."""

    rule: str
    seen: str
    cause: str
    try_: str

    @property
    def line(self) -> str:
        return f"{self.seen}: {self.cause}. Try: {self.try_}."

    def as_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "seen": self.seen, "cause": self.cause, "try": self.try_}


@dataclass
class HealthInputs:
    """What the rules read. Every field may be empty: a rule without its input stays silent."""

    history: MomentHistory | None = None
    optimizer: Optimizer | None = None
    losses: list[float] = field(default_factory=list)  # the first steps' training losses
    clipped_fraction: float | None = None
    clipped_steps: int = 0
    clip_steps: int = 0  # finite steps seen by GradientClipping
    clip_max_norm: float | None = None  # norm mode's threshold (None: another mode)
    pre_clip_norms: list[float] = field(default_factory=list)
    spike_events: list[dict[str, Any]] = field(default_factory=list)
    spike_skipped: int = 0


def _layer_series(history: MomentHistory, statistic: str) -> dict[str, list[float]]:
    """``{layer: [value per logged step]}`` without NaNs (empty when not recorded)."""
    if statistic not in history.values:
        return {}
    rows = history.values[statistic]
    series: dict[str, list[float]] = {}
    for index, layer in enumerate(history.layers):
        values = [row[index] for row in rows if not math.isnan(row[index])]
        series[layer] = values
    return series


def _adaptive(optimizer: Optimizer | None) -> bool:
    return optimizer is not None and "eps" in optimizer.defaults


def _group_value(optimizer: Optimizer | None, key: str) -> float | None:
    if optimizer is None or not optimizer.param_groups or key not in optimizer.param_groups[0]:
        return None
    value = optimizer.param_groups[0][key]
    return float(value) if isinstance(value, (int, float, torch.Tensor)) else None


def eps_dominates(inputs: HealthInputs) -> list[Finding]:
    """Layers where ``eps`` dominates Adam's denominator ``sqrt(v_hat) + eps`` for at least
    ``EPS_SHARE`` (5%) of the elements, at most logged steps (the median over steps).

    There the step size is ``lr / eps`` whatever the gradient (Kingma & Ba 2015, Algorithm 1:
    ``eps`` only guards the division); rows of an embedding that never see a gradient sit at
    ``v = 0``. Read from ``second_moment_underflow`` (share of ``v < eps^2``) and the step
    size's p95."""
    if inputs.history is None:
        return []
    shares = _layer_series(inputs.history, "second_moment_underflow")
    p95 = _layer_series(inputs.history, "step_size_p95")
    dead = set(_zero_gradient_layers(inputs.history))  # v = 0 there: the other rule's cause
    hit = {
        layer: statistics.median(values)
        for layer, values in shares.items()
        if values and layer not in dead and statistics.median(values) >= EPS_SHARE
    }
    if not hit:
        return []
    ranked = sorted(hit, key=hit.__getitem__, reverse=True)
    worst = ranked[0]
    size = p95.get(worst) or []
    size_text = f"step size p95 of {statistics.median(size):.1e} on {worst}" if size else worst
    named = ", ".join(f"{layer} {100 * hit[layer]:.0f}%" for layer in ranked[1:4])
    more = f" and {len(ranked) - 4} more layers" if len(ranked) > 4 else ""
    others = f" (also {named}{more})" if named else ""
    return [
        Finding(
            "eps_dominates",
            f"{size_text}{others}: {100 * hit[worst]:.0f}% of its elements have sqrt(v) < eps",
            "rows that never (or rarely) see a gradient sit at v≈0, so eps, not the gradient "
            "history, sets their step (lr/eps)",
            "nothing if those rows never get a gradient (unused vocabulary); otherwise raise eps "
            "(e.g. 1e-6) or give that layer a lower LR",
        )
    ]


def fp16_eps_underflow(inputs: HealthInputs) -> list[Finding]:
    """An ``eps`` below the smallest float16 subnormal (``2**-24``, about 6e-8) in a group whose
    second-moment state is float16: it rounds to 0 there (IEEE 754 binary16), so ``v = 0``
    divides by zero. The fix is the one ``AmpEpsilon`` applies (eps about 1e-4 in pure fp16)."""
    optimizer = inputs.optimizer
    if optimizer is None:
        return []
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not isinstance(eps, (int, float)) or eps >= FP16_SMALLEST:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if any(
                isinstance(v, torch.Tensor) and v.dtype == torch.float16 and v.ndim > 0
                for v in state.values()
            ):
                return [
                    Finding(
                        "fp16_eps_underflow",
                        f"eps {eps:g} with float16 optimizer state",
                        "eps rounds to 0 in float16, so an element with v = 0 divides by zero",
                        "the AmpEpsilon callback, or eps 1e-4 for pure float16 training",
                    )
                ]
    return []


def update_ratio(inputs: HealthInputs) -> list[Finding]:
    """The update/weight ratio ``||dW|| / ||W||``, median over layers at each logged step, then
    the median over the logged steps: above ``1e-2`` the LR is high, below ``1e-6`` the weights
    barely move. The usual range is around ``1e-3`` (Karpathy, CS231n "Neural Networks Part 3":
    "the ratio of the update magnitudes to the value magnitudes ... somewhere around 1e-3")."""
    if inputs.history is None or "update_to_weight" not in inputs.history.values:
        return []
    per_step = []
    for row in inputs.history.values["update_to_weight"]:
        values = [v for v in row if not math.isnan(v)]
        if values:
            per_step.append(statistics.median(values))
    if len(per_step) < 3:
        return []
    ratio = statistics.median(per_step)
    steps = f"{len(per_step)} logged steps"
    if ratio > UPDATE_RATIO_HIGH:
        return [
            Finding(
                "update_ratio_high",
                f"update/weight ratio {ratio:.1e} (median over layers and {steps}), above 1e-2",
                "the LR is high: each step changes the weights by more than 1%",
                "lower the LR (the usual ratio is about 1e-3)",
            )
        ]
    if ratio < UPDATE_RATIO_LOW:
        return [
            Finding(
                "update_ratio_low",
                f"update/weight ratio {ratio:.1e} (median over layers and {steps}), below 1e-6",
                "the LR is low (or the gradients tiny): the weights barely move",
                "raise the LR (the usual ratio is about 1e-3)",
            )
        ]
    return []


def clipping_sets_the_step(inputs: HealthInputs) -> list[Finding]:
    """Clipping acted on at least ``CLIP_SHARE`` (80%) of at least 20 finite steps, with a
    median coefficient (``max_norm / pre-clip norm``) of at most 0.5 in norm mode. For SGD the
    clip then sets the step size, not the LR; Adam-type updates normalise a common scale away,
    so there the clip mostly re-weights batches by their norm (Pascanu et al. 2013 meant
    clipping for rare explosions, not every step)."""
    fraction = inputs.clipped_fraction
    if fraction is None or inputs.clip_steps < 20 or fraction < CLIP_SHARE:
        return []
    coefficient = None
    if inputs.clip_max_norm is not None:
        norms = [n for n in inputs.pre_clip_norms if math.isfinite(n) and n > 0]
        clipped = [inputs.clip_max_norm / n for n in norms if n > inputs.clip_max_norm]
        if clipped:
            coefficient = statistics.median(clipped)
        if coefficient is None or coefficient > CLIP_COEFFICIENT:
            return []
    at = f" at a coefficient of {coefficient:.2g}" if coefficient is not None else ""
    median_norm = statistics.median(inputs.pre_clip_norms) if inputs.pre_clip_norms else None
    raise_to = f" to about the median pre-clip norm ({median_norm:.3g})" if median_norm else ""
    if _adaptive(inputs.optimizer):
        cause = (
            "every gradient is rescaled; the adaptive optimizer divides most of a common scale "
            "away, so the clip mostly re-weights batches by their norm"
        )
    else:
        cause = "the clip, not the LR, sets the step size"
    return [
        Finding(
            "clipping_every_step",
            f"{100 * fraction:.0f}% of {inputs.clip_steps} steps clipped{at}",
            cause,
            f"raise max_norm{raise_to} if clipping every step is not intended, or lower the LR",
        )
    ]


def zero_gradient_layers(inputs: HealthInputs) -> list[Finding]:
    """Layers whose gradient norm was 0 (or absent) at every logged step (at least 3): frozen
    by mistake (detached, not on the loss's path) or dead (e.g. ReLU units that never fire)."""
    history = inputs.history
    dead = _zero_gradient_layers(history) if history is not None else []
    if not dead:
        return []
    names = ", ".join(dead[:5]) + (f" and {len(dead) - 5} more" if len(dead) > 5 else "")
    return [
        Finding(
            "zero_gradients",
            f"zero gradient at all {len(history.steps)} logged steps in {names}",
            "these layers are frozen by mistake (detached, or not on the loss's path) or dead",
            "check that their output reaches the loss; freeze them on purpose "
            "(requires_grad=False) or remove them",
        )
    ]


def _zero_gradient_layers(history: MomentHistory) -> list[str]:
    if "grad_norm" not in history.values or len(history.steps) < 3:
        return []
    rows = history.values["grad_norm"]
    return [
        layer
        for index, layer in enumerate(history.layers)
        if all(math.isnan(row[index]) or row[index] == 0.0 for row in rows)
    ]


def adagrad_decay(inputs: HealthInputs) -> list[Finding]:
    """Adagrad's effective LR ``lr / (sqrt(sum g^2) + eps)`` only shrinks (Duchi et al. 2011;
    the reason for Adadelta, Zeiler 2012): a median step size (p50 over layers) at the last
    logged step below ``ADAGRAD_DECAY`` (1/100) of the first one is a finding."""
    if inputs.history is None or inputs.optimizer is None:
        return []
    if "adagrad" not in type(inputs.optimizer).__name__.lower():
        return []
    rows = inputs.history.values.get("step_size_p50") or []
    medians = [statistics.median(v for v in row if not math.isnan(v)) for row in rows if row]
    medians = [m for m in medians if m > 0]
    if len(medians) < 2 or medians[-1] >= ADAGRAD_DECAY * medians[0]:
        return []
    orders = math.log10(medians[0] / medians[-1])
    return [
        Finding(
            "adagrad_decay",
            f"Adagrad's median step size fell from {medians[0]:.1e} to {medians[-1]:.1e} "
            f"({orders:.1f} orders of magnitude)",
            "Adagrad sums squared gradients forever, so its effective LR only decays",
            "Adam/AdamW or RMSprop (a decaying average), or a higher initial LR",
        )
    ]


def loss_does_not_move(inputs: HealthInputs) -> list[Finding]:
    """Over the first ``LOSS_STEPS`` (at least 20) training losses, the mean of the last 5 is
    not below the mean of the first 5 by more than 1% of it and by more than two standard errors
    of that difference; a loss that rose by as much is reported as rising (batch-to-batch
    noise from successive differences, which a trend does
    not inflate: ``sigma = std(diff) / sqrt(2)``, ``2 * sigma * sqrt(2 / 5)``): the first advice of
    every training guide (watch the first batches; Karpathy, "A Recipe for Training Neural
    Networks", 2019)."""
    losses = [v for v in inputs.losses if math.isfinite(v)]
    if len(losses) < LOSS_MIN_STEPS:
        return []
    first, last = statistics.fmean(losses[:5]), statistics.fmean(losses[-5:])
    steps = [b - a for a, b in itertools.pairwise(losses)]
    noise = 2 * statistics.stdev(steps) / math.sqrt(2) * math.sqrt(2 / 5)
    change = max(LOSS_FLAT * abs(first), noise)
    if first - last > change:
        return []
    if last - first > change:
        return [
            Finding(
                "loss_rising",
                f"the loss rose in the first {len(losses)} steps ({first:.4g} → {last:.4g})",
                "the LR is too high (or an optimizer switch or schedule raised it)",
                "lower the LR, lengthen the warmup",
            )
        ]
    return [
        Finding(
            "loss_flat",
            f"the loss did not move in the first {len(losses)} steps ({first:.4g} → {last:.4g})",
            "the LR is too low (or still warming up), the model is frozen, or the labels are "
            "broken",
            "raise the LR 10x for a short run, check requires_grad and the labels, overfit one "
            "batch",
        )
    ]


def spikes_skipped(inputs: HealthInputs) -> list[Finding]:
    """Every skip of ``SpikeSkip`` (its thresholds are its own: mean + 6 sigma, OLMo-core)."""
    if not inputs.spike_skipped:
        return []
    events = inputs.spike_events
    steps = ", ".join(str(e["step"]) for e in events[:5]) + (" …" if len(events) > 5 else "")
    layers = [e["layer"] for e in events if e.get("layer")]
    top = max(set(layers), key=layers.count) if layers else None
    where = f"; largest gradient share in {top}" if top else ""
    return [
        Finding(
            "spikes_skipped",
            f"{inputs.spike_skipped} step(s) skipped as loss/gradient spikes (global steps "
            f"{steps}){where}",
            "a bad batch (corrupt, mislabelled or extreme examples) or the start of divergence",
            "look at the batches the skip events name; if skips come in runs, lower the LR",
        )
    ]


RULES: tuple[Callable[[HealthInputs], list[Finding]], ...] = (
    spikes_skipped,
    loss_does_not_move,
    zero_gradient_layers,
    fp16_eps_underflow,
    eps_dominates,
    update_ratio,
    clipping_sets_the_step,
    adagrad_decay,
)


def diagnose(inputs: HealthInputs) -> list[Finding]:
    """Every rule's findings, one per cause, in :data:`RULES` order."""
    return [finding for rule in RULES for finding in rule(inputs)]


class TrainingFindings(Callback):
    """Gather the rules' inputs during a fit and report the findings at its end.

    Reads the trainer's ``MomentStatistics``, ``GradientClipping`` and ``SpikeSkip`` (each
    optional) and keeps the first ``loss_steps`` training losses (the ``loss`` of
    ``training_step``'s output, kept as device scalars and read in one transfer when the rules
    run or a checkpoint is saved: no host read per step). At the end of
    training the findings are logged (one line each), kept in :attr:`findings`, logged as a
    W&B table ``findings`` when a ``WandbLogger`` is present, and sent as a W&B alert when that
    run is online.

    Args:
        loss_steps: how many first steps' losses the flat-loss rule reads (default 50).
    """

    def __init__(self, loss_steps: int = LOSS_STEPS) -> None:
        self.loss_steps = check_at_least("loss_steps", loss_steps, LOSS_MIN_STEPS)
        self.findings: list[Finding] = []
        self._losses: list[float] = []
        self._unread: list[torch.Tensor] = []  # losses not yet brought to the host
        self.pre_clip_norms: list[float] = []

    @property
    def losses(self) -> list[float]:
        """The first steps' training losses (read from the device here, once for all)."""
        if self._unread:
            self._losses.extend(torch.stack(self._unread).double().cpu().tolist())
            self._unread = []
        return self._losses

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.findings = []
        if trainer.global_step == 0:
            self._losses, self._unread, self.pre_clip_norms = [], [], []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if len(self._losses) + len(self._unread) < self.loss_steps:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._unread.append(loss.detach().reshape(()).float())
        clipping = _find(trainer, GradientClipping)
        if clipping is not None and clipping.last_pre_clip_norm is not None:
            self.pre_clip_norms.append(float(clipping.last_pre_clip_norm))
            del self.pre_clip_norms[:-10_000]

    def inputs(self, trainer: pl.Trainer) -> HealthInputs:
        """The rules' inputs from this trainer's callbacks and optimizer."""
        moments = _find(trainer, MomentStatistics)
        clipping = _find(trainer, GradientClipping)
        spikes = _find(trainer, SpikeSkip)
        return HealthInputs(
            history=getattr(moments, "history", None),
            optimizer=trainer.optimizers[0] if trainer.optimizers else None,
            losses=list(self.losses),
            clipped_fraction=clipping.clipped_fraction if clipping is not None else None,
            clipped_steps=clipping.clipped_steps if clipping is not None else 0,
            clip_steps=clipping.finite_steps if clipping is not None else 0,
            clip_max_norm=clipping.max_norm
            if clipping is not None and clipping.mode == "norm"
            else None,
            pre_clip_norms=list(self.pre_clip_norms),
            spike_events=list(spikes.events) if spikes is not None else [],
            spike_skipped=spikes.skipped_steps if spikes is not None else 0,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.findings = diagnose(self.inputs(trainer))
        if not self.findings:
            rank_zero_info("Findings: none (no rule fired)")
        for finding in self.findings:
            rank_zero_info(f"Finding: {finding.line}")
        if trainer.is_global_zero:
            _report_to_wandb(trainer, self.findings)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "pre_clip_norms": list(self.pre_clip_norms)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._losses, self._unread = list(state_dict["losses"]), []
        self.pre_clip_norms = list(state_dict["pre_clip_norms"])


def _find(trainer: pl.Trainer, kind: type[Callback]) -> Any:
    """The trainer's first callback of that class, or ``None``."""
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def _report_to_wandb(trainer: pl.Trainer, findings: Sequence[Finding]) -> None:
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        rows = [list(asdict(f).values()) for f in findings]
        logger.log_table(key="findings", columns=["rule", "seen", "cause", "try"], data=rows)
        run = logger.experiment
        online = not getattr(run, "offline", False) and getattr(run, "url", None)
        if findings and online:
            text = "\n".join(f.line for f in findings)
            run.alert(title=f"{len(findings)} training finding(s)", text=text[:4000])
