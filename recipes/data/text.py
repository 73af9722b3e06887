"""A LightningDataModule for text classification with a Hugging Face tokenizer.

The dataset is read (and checked) when the module is built, so a missing file or column is
reported before any training starts; texts are tokenized once per split in ``setup``, truncated
to ``max_length`` and padded per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from optim_callbacks.validation import check_at_least
from recipes.data.embedded import EMBEDDED_MODEL_ID, load_error, resolve_model_path
from recipes.data.resume import ResumableTrainOrder
from recipes.data.splits import NamedClasses, stratified_split
from recipes.data.text_sources import BBC_NEWS, LabelledTexts, load_text_dataset

__all__ = ["TextClassificationData"]


class TextClassificationData(NamedClasses, ResumableTrainOrder, L.LightningDataModule):
    """Texts and labels, split 80/10/10 (stratified, seeded) and tokenized.

    Args:
        dataset: ``bbc_news`` (the embedded BBC News corpus), a ``.csv``/``.jsonl`` path with
            text and label columns, or a Hugging Face ``datasets`` name (if installed).
        model_name_or_path: where the tokenizer comes from: a hub id or a local folder (the
            default is the embedded all-MiniLM-L6-v2).
        text_column: the column holding the text (CSV/JSONL/datasets).
        label_column: the column holding the label (any strings or integers).
        encoding: the text encoding of a ``.csv``/``.jsonl`` file (``latin-1``, ``cp1252``, ...).
        max_length: tokens per example; longer texts are truncated.
        batch_size: examples per batch per device.
        num_workers: DataLoader worker processes.
        val_fraction: share of each class held out for validation.
        test_fraction: share of each class held out for the final test.
        split_seed: seed of the split (fixed, so runs with other training seeds share a test set).
    """

    def __init__(
        self,
        dataset: str = BBC_NEWS,
        model_name_or_path: str = EMBEDDED_MODEL_ID,
        text_column: str = "text",
        label_column: str = "label",
        encoding: str = "utf-8",
        max_length: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        check_at_least("max_length", max_length, 2)
        check_at_least("batch_size", batch_size, 1)
        check_at_least("num_workers", num_workers, 0)
        self.save_hyperparameters()
        model_path = resolve_model_path(model_name_or_path)
        try:
            self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as error:  # a hub id while offline; a folder with no model
            raise load_error(model_name_or_path, error) from None
        self.split_indices = stratified_split(
            self.examples.labels, val_fraction, test_fraction, split_seed
        )
        self._tokenized: dict[str, list[dict[str, Any]]] = {}

    @cached_property
    def examples(self) -> LabelledTexts:
        hp = self.hparams
        return load_text_dataset(hp.dataset, hp.text_column, hp.label_column, hp.encoding)

    @property
    def classes(self) -> Sequence[str]:
        return self.examples.class_names

    def split(self, name: str) -> list[dict[str, Any]]:
        """The tokenized examples of ``train``, ``val`` or ``test`` (``input_ids``, ``labels``, ...)."""
        if name not in self._tokenized:
            indices = self.split_indices[("train", "val", "test").index(name)]
            texts = [self.examples.texts[i] for i in indices]
            encoded = self.tokenizer(texts, truncation=True, max_length=self.hparams.max_length)
            self._tokenized[name] = [
                {
                    **{key: values[row] for key, values in encoded.items()},
                    "labels": self.examples.labels[i],
                }
                for row, i in enumerate(indices)
            ]
        return self._tokenized[name]

    def setup(self, stage: str) -> None:
        for name in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(
            stage, ()
        ):
            self.split(name)

    def _loader(self, name: str, sampler: Any = None) -> DataLoader:
        data = self.split(name)
        return DataLoader(
            data,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=DataCollatorWithPadding(self.tokenizer),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # The shuffle follows the run's seed (as Lightning's DistributedSampler does under DDP).
        return self._loader("train", self.train_sampler(self.split("train")))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def state_dict(self) -> dict[str, Any]:
        return self.train_order_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_train_order_state(state_dict)
