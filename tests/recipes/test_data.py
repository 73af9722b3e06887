"""Shared recipe pieces without training: datasets, splits, sampler, loggers, the test table."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from recipes.core.cli import format_test_table
from recipes.core.loggers import build_logger, wandb_credentials_configured, wandb_mode
from recipes.data.splits import EpochSeededSampler, stratified_order, stratified_split
from recipes.data.text_sources import label_texts, load_bbc_news, load_table, load_text_dataset
from tests.recipes.tiny_text import keyword_rows, write_csv


def test_bbc_news_has_every_article_with_sorted_class_names():
    data = load_bbc_news()
    assert len(data) == 2225
    assert data.class_names == ["business", "entertainment", "politics", "sports", "tech"]
    counts = Counter(data.labels)
    assert [counts[i] for i in range(5)] == [510, 386, 417, 511, 401]
    assert all(text.strip() for text in data.texts)
    # labels follow the file's class folder: the first business article is about Time Warner
    assert "TimeWarner" in data.texts[0] and data.labels[0] == 0


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = load_bbc_news().labels
    train, val, test = stratified_split(labels, 0.1, 0.1, seed=0)
    assert sorted(train + val + test) == list(range(len(labels)))
    assert (len(train), len(val), len(test)) == (1779, 223, 223)  # 51+39+42+51+40 per split
    per_class = Counter(labels)
    for split, fraction in ((val, 0.1), (test, 0.1)):
        counts = Counter(labels[i] for i in split)
        for label, total in per_class.items():
            assert counts[label] == round(total * fraction)
    assert stratified_split(labels, 0.1, 0.1, seed=0) == (train, val, test)
    assert stratified_split(labels, 0.1, 0.1, seed=1)[2] != test


def test_every_prefix_of_an_evaluation_split_is_a_fair_sample():
    """The BBC corpus is sorted by class: a limit_test_batches prefix of a sorted test split
    held a single class. Interleaved, a prefix of n keeps each class's share to within one."""
    labels = load_bbc_news().labels
    _, val, test = stratified_split(labels, 0.1, 0.1, seed=0)
    for split in (val, test):
        shares = Counter(labels[i] for i in split)
        for n in (8, 32, 100, len(split)):
            counts = Counter(labels[i] for i in split[:n])
            for label, total in shares.items():
                assert abs(counts[label] - n * total / len(split)) <= 1, (n, label, counts)


def test_stratified_order_interleaves_the_classes_of_a_sorted_dataset():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    order = stratified_order(labels, seed=0)
    assert sorted(order) == list(range(60))
    assert [labels[i] for i in order[:6]] == [0, 1, 0, 2, 1, 0]
    assert stratified_order(labels, seed=0) == order != stratified_order(labels, seed=1)


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "message"),
    [
        (0.0, 0.1, "val_fraction"),
        (0.1, 1.0, "test_fraction"),
        (0.5, 0.5, "val_fraction + test_fraction"),
    ],
)
def test_split_fractions_are_checked(val_fraction, test_fraction, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        stratified_split([0, 1] * 10, val_fraction, test_fraction)


def test_split_of_too_few_examples_names_the_empty_split():
    with pytest.raises(ValueError, match="leave the val split empty"):
        stratified_split([0, 0, 1, 1], 0.1, 0.1)


def test_epoch_seeded_sampler_depends_on_seed_and_epoch_only():
    data = list(range(50))
    first = EpochSeededSampler(data, seed=3)
    orders = []
    for epoch in range(3):
        first.set_epoch(epoch)
        orders.append(list(first))
    assert all(sorted(order) == data for order in orders)
    assert orders[0] != orders[1] != orders[2]
    fresh = EpochSeededSampler(data, seed=3)  # e.g. after a resume
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]


def test_epoch_seeded_sampler_shares_an_epoch_between_ranks_and_resumes_each_share():
    data = list(range(21))
    whole = EpochSeededSampler(data, seed=5)
    shares = [EpochSeededSampler(data, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in (whole, *shares):
        sampler.set_epoch(1)
    order, first, second = list(whole), list(shares[0]), list(shares[1])
    assert len(first) == len(second) == 11  # padded with the epoch's first index, as DDP does
    assert first == order[0::2] and second == order[1::2] + order[:1]
    resumed = EpochSeededSampler(data, seed=5, num_replicas=2, rank=1)
    resumed.set_epoch(1)
    resumed.resume_within_epoch(epoch=1, samples_done=4)
    assert list(resumed) == second[4:]
    assert list(resumed) == second  # once: the next pass is the whole share again


def test_csv_and_jsonl_give_the_same_examples(tmp_path):
    rows = keyword_rows(per_class=4)
    csv_data = load_table(write_csv(tmp_path / "data.csv", rows))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": t, "label": y, "id": i}) for i, (t, y) in enumerate(rows))
        + "\n"
    )
    jsonl_data = load_table(jsonl)
    assert csv_data == jsonl_data
    assert csv_data.class_names == ["business", "sport", "tech"]
    assert load_text_dataset(str(jsonl)) == jsonl_data


def test_integer_labels_sort_numerically():
    data = label_texts(["a", "b", "c", "d"], [10, 2, 10, 2], "mem")
    assert data.class_names == ["2", "10"]
    assert data.labels == [1, 0, 1, 0]


def test_missing_file_empty_file_missing_column_and_one_class_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: file .*nope\.csv.* does not exist"):
        load_table(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="has no examples"):
        load_table(tmp_path / "empty.csv")
    write_csv(tmp_path / "body.csv", [("x", "a"), ("y", "b")], header=("body", "label"))
    with pytest.raises(
        ValueError, match=r"text_column: 'text' is not a column of body.csv; allowed: body, label"
    ):
        load_table(tmp_path / "body.csv")
    with pytest.raises(ValueError, match=r"label_column: 'labels' .* did you mean 'label'"):
        load_table(tmp_path / "body.csv", text_column="body", label_column="labels")
    write_csv(tmp_path / "one.csv", [("x", "a"), ("y", "a")])
    with pytest.raises(
        ValueError, match=r"label: .* has a single class \('a'\); allowed: at least 2 classes"
    ):
        load_table(tmp_path / "one.csv")


def test_wandb_goes_online_only_with_credentials(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    bare = {"HOME": str(home)}
    assert not wandb_credentials_configured(bare)
    assert wandb_mode(bare) == "offline"
    assert wandb_mode({**bare, "WANDB_API_KEY": "k" * 40}) == "online"
    (home / ".netrc").write_text(
        "machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n"
    )
    (home / ".netrc").chmod(0o600)
    assert wandb_mode(bare) == "online"
    assert wandb_mode({**bare, "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    assert wandb_mode({**bare, "WANDB_MODE": "disabled"}) == "disabled"


def test_unknown_logger_names_the_closest(tmp_path):
    with pytest.raises(
        ValueError, match=r"logger: unknown value 'tensorbord'.*did you mean 'tensorboard'"
    ):
        build_logger("tensorbord", tmp_path, "p")
    assert build_logger("none", tmp_path, "p") is False


def test_test_table_lists_accuracy_macro_f1_and_loss():
    table = format_test_table({"test_acc": 0.96, "test_f1": 0.955, "test_loss": 0.1234}, "Test")
    assert table.splitlines()[3:] == [
        "accuracy     0.9600",
        "macro F1     0.9550",
        "loss         0.1234",
    ]
