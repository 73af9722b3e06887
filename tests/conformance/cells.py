"""The conformance matrix's columns, which entries each applies to, and its support table.

A cell is one way to run an optimizer (plain loop on each implementation, a Lightning fit with
its closure in ``32-true`` / ``bf16-mixed``, a kill and resume, DDP and FSDP2 with two
processes) or one callback on top of a fit. Every registry entry meets every cell; a cell an
entry cannot support is *refused* by the library with one line naming the entry, the setting
and what to use instead, and the table says so. ``python -m tests.conformance.cells`` prints
the table that docs/conformance.md holds (a test keeps the two equal).
"""

from __future__ import annotations

import sys

import torch

from optim_callbacks import SCHEDULE_FREE, OptimizerSwitch, build_optimizer
from optim_callbacks.callbacks.switch_checks import check_source_optimizer
from tests.conformance.references import OPTIONS, entry_names, model, user_entry_registered

IMPLS = ("fused", "foreach", "for-loop")

# cell -> what it is compared with (the oracle)
CELLS: dict[str, str] = {
    "plain-fused": "the reference implementation, plain loop",
    "plain-foreach": "the reference implementation, plain loop",
    "plain-for-loop": "the reference implementation, plain loop",
    "fit-32-true": "the reference implementation, plain loop (Lightning steps through a closure)",
    "fit-bf16-mixed": "the same optimizer in a plain loop under bf16 autocast",
    "resume": "the uninterrupted fit (all callbacks on, killed after step 4)",
    "clipping": "the reference with clip_grad_norm_ on data without the non-finite batch",
    "amp-epsilon": "32-true: the fit without it; 16-true: a plain fp16 loop with that eps",
    "moment-statistics": "the fit without it; percentiles vs exact order statistics",
    "schedule-free-modes": "the reference with eval()/train() around each validation",
    "switch": "the reference, then torch SGD with the switch's options",
    "ddp": "the reference, one process, global batch",
    "fsdp2": "the reference, one process, global batch (uneven and empty shards)",
}


def refusal(name: str, cell: str) -> str | None:
    """The library's one-line refusal of ``cell`` for entry ``name``; ``None`` if supported,
    ``"n/a"`` where the cell does not apply to the entry."""
    if cell == "schedule-free-modes" and name not in SCHEDULE_FREE:
        return "n/a"
    if cell.startswith("plain-"):
        impl = cell.removeprefix("plain-")
        try:
            build_optimizer(name, model(), impl=impl, **OPTIONS.get(name, {}))
        except ValueError as error:
            return str(error)
        return None
    if cell == "switch":
        optimizer = build_optimizer(name, model(), **OPTIONS.get(name, {}))
        try:
            check_source_optimizer(optimizer, momentum_init="zero", estimates_lr=False)
        except ValueError as error:
            return str(error)
    return None


def support_table() -> str:
    """Markdown: one row per entry, one column per cell; ✓ supported and checked, ✗ refused
    (the footnotes quote the refusal), blank where the cell does not apply."""
    names = entry_names()
    header = "| entry | " + " | ".join(CELLS) + " |"
    lines = [header, "|" + "---|" * (len(CELLS) + 1)]
    notes: list[str] = []
    for name in names:
        row = []
        for cell in CELLS:
            why = refusal(name, cell)
            if why is None:
                row.append("✓")
            elif why == "n/a":
                row.append("")
            else:
                if why not in notes:
                    notes.append(why)
                row.append(f"✗{notes.index(why) + 1}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{k}. {why}" for k, why in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main() -> None:
    torch.set_num_threads(1)
    with user_entry_registered():
        sys.stdout.write(support_table())


if __name__ == "__main__":
    main()

__all__ = ["CELLS", "IMPLS", "OptimizerSwitch", "refusal", "support_table"]
