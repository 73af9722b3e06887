"""Vision models for the recipes: transformers' ViT and ResNet classifiers.

With no checkpoint a small configuration sized for 28 x 28 grey images is trained from
initialisation (no Python package ships pretrained ViT or ResNet weights). With
``checkpoint`` (a Hugging Face hub id, or a folder written by ``save_pretrained``) the weights
are loaded and the classifier head is replaced for the new label count
(``num_labels`` + ``ignore_mismatched_sizes=True``); :func:`expected_input` tells the data
transform which channels, image size and normalization that checkpoint wants.

Small defaults, picked by short trials on the 2-core CPU (Fashion-MNIST within minutes):

- ViT (Dosovitskiy et al. 2021): 7 x 7 patches of a 28 x 28 image (16 tokens + [CLS]), hidden
  size 128, 6 layers, 4 heads, MLP 256; 0.81M parameters. Weights start at std 0.1
  (``initializer_range``, about 1/sqrt(hidden size)) instead of ViT-Base's 0.02: in 300-step
  trials the small ViT learned markedly faster so. A 4 x 4-patch ViT (49 tokens) as cheap per
  step (hidden 64, 4 layers) reached 81.2% after 300 steps, this one 84.1%.
- ResNet (He et al. 2016): basic blocks, stem width 64, stages (64, 128, 256) with one block
  each; 1.23M parameters. transformers' stem (7 x 7 conv stride 2 + max-pool) turns 28 px into
  7 x 7 maps, which keeps a step cheap on a CPU. In trials it matched (slightly beat) stages
  (32, 64, 128) x 2 blocks trained for 10 epochs in the CPU time of 6 epochs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from transformers import (
    AutoConfig,
    PreTrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.image_processing_base import ImageProcessingMixin

from optim_callbacks.validation import check_at_least, check_choice, check_unknown_options
from recipes.data.images import ImageInput

__all__ = [
    "FAMILIES",
    "build_image_classifier",
    "expected_input",
    "small_resnet_config",
    "small_vit_config",
]

Family = Literal["vit", "resnet"]

SMALL_VIT = {
    "image_size": 28,
    "patch_size": 7,
    "num_channels": 1,
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "initializer_range": 0.1,
}
SMALL_RESNET = {
    "num_channels": 1,
    "embedding_size": 64,
    "hidden_sizes": [64, 128, 256],
    "depths": [1, 1, 1],
    "layer_type": "basic",
}
FAMILIES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel], Mapping[str, Any]]] = {
    "vit": (ViTConfig, ViTForImageClassification, SMALL_VIT),
    "resnet": (ResNetConfig, ResNetForImageClassification, SMALL_RESNET),
}


def _label_maps(num_labels: int, labels: Sequence[str] | None) -> dict[str, Any]:
    if labels is None:
        labels = [f"LABEL_{i}" for i in range(num_labels)]
    elif len(labels) != num_labels:
        raise ValueError(f"labels: got {len(labels)} names for num_labels={num_labels}")
    return {
        "num_labels": num_labels,
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def _small_config(
    family: str, num_labels: int, labels: Sequence[str] | None, overrides: Mapping[str, Any]
) -> PreTrainedConfig:
    config_class, _, defaults = FAMILIES[family]
    allowed = [k for k in config_class().to_dict() if not k.startswith("_")]
    check_unknown_options(f"model.config ({family})", overrides, allowed)
    try:
        return config_class(**{**defaults, **overrides, **_label_maps(num_labels, labels)})
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"model.config: {dict(overrides)!r} is not a valid {config_class.__name__}: {error}"
        ) from None


def small_vit_config(
    num_labels: int = 10, labels: Sequence[str] | None = None, **overrides: Any
) -> ViTConfig:
    """The from-scratch ViT for 28 x 28 grey images; ``overrides`` change any ``ViTConfig`` field."""
    return _small_config("vit", num_labels, labels, overrides)


def small_resnet_config(
    num_labels: int = 10, labels: Sequence[str] | None = None, **overrides: Any
) -> ResNetConfig:
    """The from-scratch ResNet for 28 x 28 grey images; ``overrides`` change any ``ResNetConfig`` field."""
    return _small_config("resnet", num_labels, labels, overrides)


def _checkpoint_config(family: str, checkpoint: str) -> PreTrainedConfig:
    config_class = FAMILIES[family][0]
    looks_local = os.path.isabs(checkpoint) or checkpoint.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(checkpoint)):
        raise ValueError(
            f"model.checkpoint: folder {checkpoint!r} does not exist; allowed: a folder written by "
            "save_pretrained or a Hugging Face hub id such as 'google/vit-base-patch16-224'"
        )
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        kind = "folder" if os.path.isdir(checkpoint) else "hub id"
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise ValueError(
            f"model.checkpoint: {checkpoint!r} ({kind}) is not a loadable model ({first_line}); allowed: a "
            f"Hugging Face hub id or a folder written by save_pretrained holding a {config_class.model_type!r} "
            "config.json and weights"
        ) from None
    if config.model_type != config_class.model_type:
        raise ValueError(
            f"model.checkpoint: {checkpoint!r} holds a {config.model_type!r} model; allowed: a "
            f"{config_class.model_type!r} checkpoint for this recipe"
        )
    return config


def build_image_classifier(
    family: Family,
    num_labels: int,
    checkpoint: str | None = None,
    *,
    labels: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    """A ``ViTForImageClassification`` or ``ResNetForImageClassification`` for ``num_labels``.

    ``checkpoint`` None: the small configuration (``config`` overrides any field) from
    initialisation. Otherwise the checkpoint's weights with a fresh classifier head when its
    label count differs (``ignore_mismatched_sizes=True``).
    """
    check_choice("model.family", family, FAMILIES)
    check_at_least("num_labels", num_labels, 1)
    _, model_class, _ = FAMILIES[family]
    if checkpoint is None:
        return model_class(_small_config(family, num_labels, labels, config or {}))
    _checkpoint_config(family, checkpoint)
    if config:
        raise ValueError(
            "model.config: overrides apply to the from-scratch model only; allowed with model.checkpoint: none"
        )
    try:
        return model_class.from_pretrained(
            checkpoint, ignore_mismatched_sizes=True, **_label_maps(num_labels, labels)
        )
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model.checkpoint: {checkpoint!r} has a config but no loadable weights ({error}); allowed: a folder "
            "written by save_pretrained or a hub id"
        ) from None


def _processor_size(processor: Mapping[str, Any]) -> int | None:
    size = processor.get("crop_size") if processor.get("do_center_crop") else None
    size = size or processor.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, Mapping):
        return size.get("height") or size.get("shortest_edge")
    return None


def expected_input(model: PreTrainedModel, checkpoint: str | None = None) -> ImageInput:
    """Channels, side length and normalization the model wants.

    Side length: the checkpoint's image processor size (e.g. 224), else ``config.image_size``
    (ViT's position embeddings fix it), else ``None`` (a ResNet takes any size). Mean/std: the
    checkpoint's image processor's, when it has one.
    """
    config = model.config
    processor: dict[str, Any] = {}
    if checkpoint is not None:
        try:
            processor, _ = ImageProcessingMixin.get_image_processor_dict(checkpoint)
        except (OSError, ValueError):
            processor = {}
    image_size = _processor_size(processor) or getattr(config, "image_size", None)
    if isinstance(image_size, (list, tuple)):
        image_size = int(image_size[0])
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if processor.get("do_normalize") is False:
        mean, std = None, None
    return ImageInput(
        num_channels=int(config.num_channels),
        image_size=image_size,
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
    )
