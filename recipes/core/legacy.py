"""Configurations written before the optimizer settings became one object still load.

Until version 0.1 the recipe modules took ``layer_decay``, ``optimizer_options`` and
``scheduler_options`` directly (``--model.layer_decay 0.8``; a saved ``config.yaml`` has them
under ``model:``); they are fields of ``model.optimization`` now, and ``last.ckpt`` belongs to
the rolling ``last_checkpoint`` callback instead of the best-checkpoint one. :func:`upgrade_args` rewrites
such flags and ``--config`` files on the way in, so a run's saved configuration, an old sweep's
options and old shell history keep working. Everything else passes unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

__all__ = ["MOVED_MODEL_OPTIONS", "upgrade_args", "upgrade_config"]

MOVED_MODEL_OPTIONS = ("layer_decay", "optimizer_options", "scheduler_options")


def upgrade_config(config: dict) -> bool:
    """Move the old ``model`` keys of a parsed YAML config under ``model.optimization`` (in
    place); whether anything moved."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not any(key in model for key in MOVED_MODEL_OPTIONS):
        return False
    optimization = model.setdefault("optimization", {}) or {}
    for key in MOVED_MODEL_OPTIONS:
        if key in model:
            optimization.setdefault(key, model.pop(key))
    model["optimization"] = optimization
    # The best-checkpoint callback kept last.ckpt then; the rolling last_checkpoint does now.
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, dict) and (checkpoint.get("init_args") or {}).get("save_last"):
        checkpoint["init_args"]["save_last"] = None
    return True


def _upgraded_config_file(value: str) -> str:
    path = Path(value)
    if not path.is_file():
        return value  # not a file (or missing): the parser reports it
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return value
    # The parser accepts a config given as YAML text in place of a path.
    return yaml.safe_dump(config, sort_keys=False) if upgrade_config(config) else value


def upgrade_args(args: Sequence[str]) -> list[str]:
    """``args`` with old ``--model.<moved option>`` flags and ``--config`` files upgraded."""
    upgraded: list[str] = []
    expect_config = False
    for token in args:
        if expect_config:
            upgraded.append(_upgraded_config_file(token))
            expect_config = False
            continue
        name, sep, value = token.partition("=")
        if name == "--config":
            if sep:
                upgraded.append(f"--config={_upgraded_config_file(value)}")
            else:
                upgraded.append(token)
                expect_config = True
            continue
        for key in MOVED_MODEL_OPTIONS:
            if name == f"--model.{key}" or name.startswith(f"--model.{key}."):
                name = name.replace("--model.", "--model.optimization.", 1)
        upgraded.append(name + sep + value)
    return upgraded
