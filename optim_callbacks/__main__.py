"""``python -m optim_callbacks list``: the optimizers and schedules this package knows."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from optim_callbacks.optimizers import OPTIMIZERS
from optim_callbacks.schedules import SCHEDULES


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_format(v) for v in value) + ")"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([line.rstrip(), rule, *body])


def optimizer_table() -> str:
    rows = []
    for name, spec in OPTIMIZERS.items():
        defaults = " ".join(f"{k}={_format(v)}" for k, v in spec.defaults.items())
        module = spec.optimizer_class.__module__
        prefix = "torch.optim" if module.startswith("torch.") else module.split(".")[0]
        cls = f"{prefix}.{spec.optimizer_class.__name__}"
        rows.append([name, cls, defaults, spec.description])
    return _table(["optimizer", "class", "defaults", "description"], rows)


def schedule_table() -> str:
    rows = []
    for name, spec in SCHEDULES.items():
        options = " ".join(f"{k}={_format(v)}" for k, v in spec.defaults.items()) or "-"
        rows.append([name, options, spec.description])
    return _table(["scheduler", "options", "description"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optim_callbacks", description=__doc__)
    parser.add_argument("command", choices=["list"], help="what to do")
    parser.parse_args(argv)
    print(optimizer_table())
    print()
    print(schedule_table())
    print(
        "\nEvery scheduler takes warmup (steps, or a fraction of total steps) and warmup_kind (linear|exponential)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
