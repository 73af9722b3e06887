"""Vision models: small from-scratch configs, fine-tuning from save_pretrained folders, errors."""

from __future__ import annotations

import json

import pytest
import torch

from optim_callbacks import build_optimizer
from recipes.models.vision import build_image_classifier, expected_input

TINY = {
    "vit": {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    },
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
}


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_small_default_models_classify_28px_grey_images(family):
    model = build_image_classifier(family, 10, labels=[f"c{i}" for i in range(10)])
    wanted = expected_input(model)
    assert wanted.num_channels == 1
    assert wanted.image_size == (28 if family == "vit" else None)
    assert wanted.mean is None and wanted.std is None
    logits = model(pixel_values=torch.randn(4, 1, 28, 28)).logits
    assert tuple(logits.shape) == (4, 10)
    assert model.config.id2label[3] == "c3"


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_finetuning_a_saved_model_replaces_only_the_head(tmp_path, family):
    source = build_image_classifier(family, 10, config=TINY[family])
    source.save_pretrained(tmp_path / "saved")
    tuned = build_image_classifier(
        family, 3, checkpoint=str(tmp_path / "saved"), labels=["a", "b", "c"]
    )
    assert tuned.config.num_labels == 3 and tuned.config.id2label == {0: "a", 1: "b", 2: "c"}
    saved = source.state_dict()
    head = "classifier." if family == "vit" else "classifier.1."
    for name, tensor in tuned.state_dict().items():
        if name.startswith(head):
            assert tensor.shape[0] == 3
        else:
            assert torch.equal(tensor, saved[name]), name
    logits = tuned(pixel_values=torch.randn(2, 1, 28, 28)).logits
    assert tuple(logits.shape) == (2, 3)


def test_a_checkpoint_image_processor_sets_size_and_statistics(tmp_path):
    model = build_image_classifier("resnet", 10, config={**TINY["resnet"], "num_channels": 3})
    model.save_pretrained(tmp_path)
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "size": {"shortest_edge": 224},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    tuned = build_image_classifier("resnet", 4, checkpoint=str(tmp_path))
    wanted = expected_input(tuned, str(tmp_path))
    assert wanted.num_channels == 3 and wanted.image_size == 224
    assert wanted.mean == (0.485, 0.456, 0.406) and wanted.std == (0.229, 0.224, 0.225)


def test_vit_layer_decay_scales_each_encoder_layer():
    model = build_image_classifier("vit", 10, config={**TINY["vit"], "num_hidden_layers": 3})
    optimizer = build_optimizer("adamw", model, lr=1e-3, layer_decay=0.5)
    scale_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale_of[names[id(p)]] = group["lr"] / 1e-3
    assert scale_of["vit.embeddings.patch_embeddings.projection.weight"] == pytest.approx(0.5**4)
    assert scale_of["vit.layers.0.attention.q_proj.weight"] == pytest.approx(0.5**3)
    assert scale_of["vit.layers.2.mlp.fc2.weight"] == pytest.approx(0.5)
    assert scale_of["classifier.weight"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("make_checkpoint", "message"),
    [
        (lambda d: str(d / "missing"), r"model\.checkpoint: folder '.*missing' does not exist"),
        (lambda d: str(d), r"model\.checkpoint: '.*' \(folder\) is not a loadable model"),
        (
            "resnet-folder",
            r"model\.checkpoint: '.*' holds a 'resnet' model; allowed: a 'vit' checkpoint",
        ),
        ("config-only", r"model\.checkpoint: '.*' has a config but no loadable weights"),
    ],
)
def test_a_checkpoint_that_is_not_a_model_gives_one_message(tmp_path, make_checkpoint, message):
    if make_checkpoint == "resnet-folder":
        build_image_classifier("resnet", 2, config=TINY["resnet"]).save_pretrained(tmp_path)
        checkpoint = str(tmp_path)
    elif make_checkpoint == "config-only":
        build_image_classifier("vit", 2, config=TINY["vit"]).config.save_pretrained(tmp_path)
        checkpoint = str(tmp_path)
    else:
        checkpoint = make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=message):
        build_image_classifier("vit", 2, checkpoint=checkpoint)


def test_config_overrides_are_checked(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown option 'hidden_szie'.*did you mean 'hidden_size'"
    ):
        build_image_classifier("vit", 10, config={"hidden_szie": 64})
    with pytest.raises(ValueError, match=r"model\.family: unknown value 'vgg'"):
        build_image_classifier("vgg", 10)
    build_image_classifier("vit", 2, config=TINY["vit"]).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"model\.config: overrides apply to the from-scratch model only"
    ):
        build_image_classifier("vit", 10, checkpoint=str(tmp_path), config={"hidden_size": 8})


@pytest.mark.parametrize(
    ("family", "count", "kind"), [("vit", 6, "ViTLayer"), ("resnet", 3, "ResNetStage")]
)
def test_fsdp2_shards_each_vit_layer_and_each_resnet_stage(family, count, kind):
    from recipes.core.classification import ClassificationModule

    module = ClassificationModule(build_image_classifier(family, 10), 10)
    blocks = module.sharded_blocks()
    assert [type(block).__name__ for block in blocks] == [kind] * count
