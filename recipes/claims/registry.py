"""The pre-registered experiments of the claims study (``configs/claims.yaml``), read and checked.

The file declares tasks (a recipe and the options that shorten it to the study's budget), arms
(one optimizer on one task with its own options and a learning-rate rule) and claims (the
survey's words, quoted, with the comparisons of arms that test them, the metric and the
direction the claim predicts). :func:`load_registry` turns it into frozen dataclasses and
refuses an incomplete or inconsistent file with one ``ValueError`` naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COMBINE_RULES",
    "DEFAULT_REGISTRY",
    "DIRECTIONS",
    "METRICS",
    "RELATIONS",
    "Arm",
    "Claim",
    "Comparison",
    "Registry",
    "Task",
    "load_registry",
    "parse_registry",
]

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "configs" / "claims.yaml"
METRICS: Mapping[str, str] = {
    "test_acc": "test accuracy of the checkpoint with the best validation accuracy",
    "final_val_loss": "validation loss at the last validation",
    "mean_val_loss": "mean validation loss over the run's validations (lower: faster)",
    "effective_lr_log10_ratio": "log10 of the effective LR lr/sqrt(v) at the end over the start",
}
DIRECTIONS = ("higher", "lower")
RELATIONS = (">", ">=")
# all: supported if every comparison is, contradicted if any is; any: supported if one is,
# contradicted if all are; first: the first comparison decides, the others are reported;
# per_task: one verdict per task (the comparisons of a task combined by "all").
COMBINE_RULES = ("all", "any", "first", "per_task")
MIN_SEEDS = 3


@dataclass(frozen=True)
class Task:
    name: str
    recipe: str
    title: str
    budget: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    validations_per_epoch: int


@dataclass(frozen=True)
class Arm:
    name: str
    task: str
    title: str
    optimizer: str
    args: tuple[str, ...]
    fixed_lr: float | None  # None: the LR search chooses it

    @property
    def searched(self) -> bool:
        return self.fixed_lr is None


@dataclass(frozen=True)
class Comparison:
    arm: str
    other: str | None  # None: a one-sample test of ``arm`` against 0
    relation: str = ">"


@dataclass(frozen=True)
class Claim:
    id: str
    quote: str
    source: str
    origin: str  # "issue" or "implied"
    metric: str
    direction: str
    combine: str
    comparisons: tuple[Comparison, ...]
    note: str = ""


@dataclass(frozen=True)
class Registry:
    version: int
    seeds: tuple[int, ...]
    lr_trials: int
    lr_range: float
    pruner: str
    tasks: Mapping[str, Task]
    arms: Mapping[str, Arm]  # in run order
    claims: tuple[Claim, ...]

    def arms_of(self, claims: Sequence[Claim]) -> list[Arm]:
        """The arms ``claims`` compare, in run order."""
        wanted = {c.arm for claim in claims for c in claim.comparisons} | {
            c.other for claim in claims for c in claim.comparisons if c.other is not None
        }
        return [arm for name, arm in self.arms.items() if name in wanted]

    def claim(self, claim_id: str) -> Claim:
        for claim in self.claims:
            if claim.id == claim_id:
                return claim
        raise ValueError(_unknown("claims", claim_id, [c.id for c in self.claims]))


def _unknown(field: str, value: Any, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    hint = f" (closest: {close[0]!r})" if close else ""
    return f"{field}: got {value!r}{hint}; allowed: {', '.join(map(str, allowed))}"


def _need(mapping: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: got {mapping!r}; allowed: a mapping with {key!r}")
    if key not in mapping or mapping[key] in (None, ""):
        raise ValueError(f"{where}.{key}: missing; allowed: a {_kind_name(kind)}")
    value = mapping[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where}.{key}: got {value!r}; allowed: a {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "string", int: "integer", float: "number", list: "list", dict: "mapping"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _args(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ValueError(f"{where}: got {value!r}; allowed: a list of command-line tokens")
    return tuple(str(v) for v in value)


def _task(name: str, raw: Mapping[str, Any]) -> Task:
    from recipes.sweep.plan import available_recipes

    where = f"tasks.{name}"
    recipe = _need(raw, "recipe", where, str)
    if recipe not in available_recipes():
        raise ValueError(_unknown(f"{where}.recipe", recipe, available_recipes()))
    vpe = raw.get("validations_per_epoch", 4)
    if not isinstance(vpe, int) or vpe < 1:
        raise ValueError(f"{where}.validations_per_epoch: got {vpe!r}; allowed: an integer >= 1")
    return Task(
        name=name,
        recipe=recipe,
        title=_need(raw, "title", where, str),
        budget=" ".join(_need(raw, "budget", where, str).split()),
        args=_args(_need(raw, "args", where, list), f"{where}.args"),
        quick_args=_args(_need(raw, "quick_args", where, list), f"{where}.quick_args"),
        validations_per_epoch=vpe,
    )


def _arm(name: str, raw: Mapping[str, Any], tasks: Mapping[str, Task]) -> Arm:
    from optim_callbacks import OPTIMIZERS

    where = f"arms.{name}"
    task = _need(raw, "task", where, str)
    if task not in tasks:
        raise ValueError(_unknown(f"{where}.task", task, list(tasks)))
    optimizer = _need(raw, "optimizer", where, str)
    if optimizer not in OPTIMIZERS.names():
        raise ValueError(_unknown(f"{where}.optimizer", optimizer, OPTIMIZERS.names()))
    lr = raw.get("lr")
    if lr == "search":
        fixed = None
    elif isinstance(lr, Mapping) and set(lr) == {"fixed"} and _positive(lr["fixed"]):
        fixed = float(lr["fixed"])
    else:
        raise ValueError(f"{where}.lr: got {lr!r}; allowed: search, or {{fixed: LR > 0}}")
    return Arm(
        name=name,
        task=task,
        title=_need(raw, "title", where, str),
        optimizer=optimizer,
        args=_args(raw.get("args"), f"{where}.args"),
        fixed_lr=fixed,
    )


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _claim(raw: Mapping[str, Any], arms: Mapping[str, Arm], index: int) -> Claim:
    where = f"claims[{index}]"
    claim_id = _need(raw, "id", where, str)
    where = f"claims.{claim_id}"
    metric = _need(raw, "metric", where, str)
    if metric not in METRICS:
        raise ValueError(_unknown(f"{where}.metric", metric, list(METRICS)))
    direction = _need(raw, "direction", where, str)
    if direction not in DIRECTIONS:
        raise ValueError(_unknown(f"{where}.direction", direction, DIRECTIONS))
    combine = raw.get("combine", "all")
    if combine not in COMBINE_RULES:
        raise ValueError(_unknown(f"{where}.combine", combine, COMBINE_RULES))
    origin = _need(raw, "origin", where, str)
    if origin not in ("issue", "implied"):
        raise ValueError(_unknown(f"{where}.origin", origin, ["issue", "implied"]))
    raw_comparisons = _need(raw, "comparisons", where, list)
    comparisons = []
    for position, entry in enumerate(raw_comparisons):
        at = f"{where}.comparisons[{position}]"
        arm = _need(entry, "arm", at, str)
        if arm not in arms:
            raise ValueError(_unknown(f"{at}.arm", arm, list(arms)))
        other = entry.get("other")
        if other is not None and other not in arms:
            raise ValueError(_unknown(f"{at}.other", other, list(arms)))
        if other == arm:
            raise ValueError(f"{at}.other: got {other!r}, the arm itself; allowed: another arm")
        relation = entry.get("relation", ">")
        if relation not in RELATIONS:
            raise ValueError(_unknown(f"{at}.relation", relation, RELATIONS))
        comparisons.append(Comparison(arm=arm, other=other, relation=relation))
    return Claim(
        id=claim_id,
        quote=_need(raw, "quote", where, str),
        source=_need(raw, "source", where, str),
        origin=origin,
        metric=metric,
        direction=direction,
        combine=combine,
        comparisons=tuple(comparisons),
        note=" ".join(str(raw.get("note") or "").split()),
    )


def parse_registry(raw: Mapping[str, Any]) -> Registry:
    """A registry from the parsed YAML mapping, checked (see the module docstring)."""
    from recipes.sweep.plan import PRUNERS

    if not isinstance(raw, Mapping):
        raise ValueError(f"registry: got {type(raw).__name__}; allowed: a YAML mapping")
    version = _need(raw, "version", "registry", int)
    defaults = _need(raw, "defaults", "registry", dict)
    seeds = _need(defaults, "seeds", "defaults", list)
    if (
        len(seeds) < MIN_SEEDS
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or list(seeds) != list(range(seeds[0], seeds[0] + len(seeds)))
    ):
        raise ValueError(
            f"defaults.seeds: got {seeds!r}; allowed: at least {MIN_SEEDS} consecutive "
            "integers such as [42, 43, 44]"
        )
    search = _need(defaults, "lr_search", "defaults", dict)
    trials = _need(search, "trials", "defaults.lr_search", int)
    if trials < 2:
        raise ValueError(f"defaults.lr_search.trials: got {trials}; allowed: an integer >= 2")
    lr_range = _need(search, "range", "defaults.lr_search", (int, float))
    if not lr_range > 1:
        raise ValueError(f"defaults.lr_search.range: got {lr_range}; allowed: a number > 1")
    pruner = _need(search, "pruner", "defaults.lr_search", str)
    if pruner not in PRUNERS:
        raise ValueError(_unknown("defaults.lr_search.pruner", pruner, PRUNERS))
    tasks = {
        name: _task(name, entry) for name, entry in _need(raw, "tasks", "registry", dict).items()
    }
    arms = {
        name: _arm(name, entry, tasks)
        for name, entry in _need(raw, "arms", "registry", dict).items()
    }
    claims = tuple(
        _claim(entry, arms, i) for i, entry in enumerate(_need(raw, "claims", "registry", list))
    )
    ids = [c.id for c in claims]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"claims: got the id {repeated[0]!r} twice; allowed: each id once")
    used = {c.arm for claim in claims for c in claim.comparisons} | {
        c.other for claim in claims for c in claim.comparisons if c.other
    }
    unused = [name for name in arms if name not in used]
    if unused:
        raise ValueError(f"arms.{unused[0]}: no claim compares it; allowed: arms a claim uses")
    return Registry(
        version=version,
        seeds=tuple(seeds),
        lr_trials=trials,
        lr_range=float(lr_range),
        pruner=pruner,
        tasks=tasks,
        arms=arms,
        claims=claims,
    )


def load_registry(path: str | Path = DEFAULT_REGISTRY) -> Registry:
    """The registry in the YAML file ``path``, checked."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"registry: got {str(path)!r}, which is no file; allowed: a YAML file")
    with path.open(encoding="utf-8") as handle:
        return parse_registry(yaml.safe_load(handle))
