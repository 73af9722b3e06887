"""Labelled texts from the embedded BBC News corpus, a CSV/JSONL file or a Hugging Face dataset.

Every loader returns :class:`LabelledTexts`: the texts, integer labels and the class names they
index. Class names are sorted (numerically when every label is an integer), so label ``i`` means
the same class on every machine, whatever the order of files or rows. Bad input is one
``ValueError`` naming the parameter, the value and what is allowed.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optim_callbacks.validation import closest
from recipes.data.embedded import bbc_news_dir

__all__ = [
    "BBC_NEWS",
    "LabelledTexts",
    "label_texts",
    "load_bbc_news",
    "load_hub_dataset",
    "load_table",
    "load_text_dataset",
]

BBC_NEWS = "bbc_news"
TABLE_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels; ``labels[i]`` indexes ``class_names``."""

    texts: list[str]
    labels: list[int]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def _sorted_classes(raw_labels: Sequence[Any]) -> list[Any]:
    distinct = set(raw_labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return sorted({str(v) for v in distinct})


def label_texts(
    texts: Sequence[str], raw_labels: Sequence[Any], source: str, label_column: str = "label"
) -> LabelledTexts:
    """Number the distinct labels in sorted order; refuse an empty set or a single class."""
    if not texts:
        raise ValueError(
            f"dataset: {source!r} has no examples; allowed: at least one example per class, two classes"
        )
    classes = _sorted_classes(raw_labels)
    if len(classes) < 2:
        raise ValueError(
            f"{label_column}: {source!r} has a single class ({classes[0]!r}); allowed: at least 2 classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    numeric = isinstance(classes[0], int)
    labels = [index[v if numeric else str(v)] for v in raw_labels]
    return LabelledTexts(list(texts), labels, [str(c) for c in classes])


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Latin-1
        return data.decode("latin-1")


def load_bbc_news(root: Path | None = None) -> LabelledTexts:
    """The BBC News corpus: ``<root>/<class>/*.txt``, class names sorted, files in name order."""
    root = root or bbc_news_dir()
    texts: list[str] = []
    raw_labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.txt")):
            texts.append(_read_text(path).strip())
            raw_labels.append(class_dir.name)
    return label_texts(texts, raw_labels, BBC_NEWS)


def _check_column(param: str, column: str, columns: Sequence[str], path: Path) -> None:
    if column in columns:
        return
    suggestion = closest(column, columns)
    hint = f"; did you mean {suggestion[0]!r}?" if suggestion else ""
    raise ValueError(
        f"{param}: {column!r} is not a column of {path.name}; allowed: {', '.join(map(str, columns)) or 'none'}{hint}"
    )


def _rows(path: Path, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[str]]:
    try:
        return _decoded_rows(path, encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"encoding: {path.name} is not {encoding} text (byte {error.object[error.start]:#04x} "
            f"at position {error.start}); allowed: a {encoding} file, or --data.encoding with the "
            "file's encoding (e.g. latin-1, cp1252)"
        ) from None
    except LookupError:
        raise ValueError(
            f"encoding: got {encoding!r}; allowed: a Python codec name such as utf-8, latin-1, "
            "cp1252"
        ) from None


def _decoded_rows(path: Path, encoding: str) -> tuple[list[dict[str, Any]], list[str]]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding=encoding) as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    rows = []
    with path.open(encoding=encoding) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"dataset: line {number} of {path.name} is not JSON ({error.msg})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(f"dataset: line {number} of {path.name} is not a JSON object")
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return rows, columns


def load_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    encoding: str = "utf-8",
) -> LabelledTexts:
    """Rows of a ``.csv`` (with a header) or ``.jsonl`` (one object per line) file, read as
    ``encoding`` text."""
    path = Path(path)
    if path.suffix not in TABLE_SUFFIXES:
        raise ValueError(
            f"dataset: {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(TABLE_SUFFIXES)}"
        )
    if not path.is_file():
        raise ValueError(
            f"dataset: file {str(path)!r} does not exist; allowed: an existing .csv/.jsonl file or {BBC_NEWS!r}"
        )
    rows, columns = _rows(path, encoding)
    if not rows:
        raise ValueError(
            f"dataset: {str(path)!r} has no examples; allowed: a file with at least two classes"
        )
    _check_column("text_column", text_column, columns, path)
    _check_column("label_column", label_column, columns, path)
    texts, raw_labels = [], []
    for number, row in enumerate(rows, start=1):
        text, label = row.get(text_column), row.get(label_column)
        if label is None or label == "" or text is None:
            raise ValueError(
                f"dataset: example {number} of {path.name} has no {text_column!r} or {label_column!r}"
            )
        texts.append(str(text))
        raw_labels.append(label)
    return label_texts(texts, raw_labels, str(path), label_column)


def load_hub_dataset(
    name: str, text_column: str = "text", label_column: str = "label"
) -> LabelledTexts:
    """The ``train`` split of a Hugging Face ``datasets`` dataset (needs the ``datasets`` package)."""
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(
            f"dataset: {name!r} is neither {BBC_NEWS!r} nor a .csv/.jsonl path, and the Hugging Face "
            "`datasets` package is not installed; allowed: bbc_news, a .csv/.jsonl path, or a datasets "
            "name after `pip install datasets`"
        )
    import datasets

    table = datasets.load_dataset(name, split="train")
    columns = list(table.column_names)
    _check_column("text_column", text_column, columns, Path(name))
    _check_column("label_column", label_column, columns, Path(name))
    feature = table.features[label_column]
    raw_labels = list(table[label_column])
    if isinstance(feature, datasets.ClassLabel):  # keep the dataset's own names, in its order
        names = list(feature.names)
        used = sorted(set(raw_labels))
        if len(used) < 2:
            raise ValueError(
                f"{label_column}: {name!r} has a single class; allowed: at least 2 classes"
            )
        return LabelledTexts(list(table[text_column]), raw_labels, names)
    return label_texts(list(table[text_column]), raw_labels, name, label_column)


def load_text_dataset(
    dataset: str, text_column: str = "text", label_column: str = "label", encoding: str = "utf-8"
) -> LabelledTexts:
    """``bbc_news``, a ``.csv``/``.jsonl`` path (read as ``encoding`` text), or a Hugging Face
    ``datasets`` name."""
    if dataset == BBC_NEWS:
        return load_bbc_news()
    if Path(dataset).suffix in TABLE_SUFFIXES or Path(dataset).exists():
        return load_table(dataset, text_column, label_column, encoding)
    return load_hub_dataset(dataset, text_column, label_column)
