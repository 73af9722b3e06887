import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from optim_callbacks import (
    build_optimizer,
    global_batch_size,
    no_decay_parameter_names,
    param_groups,
    scale_lr,
)
from optim_callbacks.__main__ import main as list_command


def _tiny_bert(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def test_no_decay_on_biases_and_normalization_weights():
    model = _tiny_bert()
    skip = no_decay_parameter_names(model)
    for name, param in model.named_parameters():
        expect_skip = name.endswith(".bias") or "LayerNorm" in name or param.ndim < 2
        assert (name in skip) == expect_skip, name


def test_every_parameter_of_a_batch_or_instance_norm_subclass_gets_no_decay():
    class BatchWhitening(nn.BatchNorm1d):  # a name that does not end in "norm"
        def __init__(self, features: int) -> None:
            super().__init__(features)
            self.mixing = nn.Parameter(torch.eye(features))  # 2-D: not caught by ndim < 2

    model = nn.Sequential(nn.Linear(4, 4), BatchWhitening(4), nn.InstanceNorm1d(4, affine=True))
    assert no_decay_parameter_names(model) == {
        "0.bias",
        "1.weight",
        "1.bias",
        "1.mixing",
        "2.weight",
        "2.bias",
    }


def test_model_no_weight_decay_hook_is_honoured():
    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.pos = nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = nn.Linear(8, 8)

        def no_weight_decay(self):
            return {"cls_token", "pos"}

    groups = param_groups(WithToken(), weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert len(by_name["decay"]["params"]) == 1  # proj.weight only
    assert len(by_name["no_decay"]["params"]) == 3


def test_frozen_parameters_are_left_out():
    model = _tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    total = sum(len(g["params"]) for g in param_groups(model, 0.01))
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_layer_decay_scales_each_encoder_layer():
    model = _tiny_bert(layers=3)
    optimizer = build_optimizer("adamw", model, lr=1e-3, layer_decay=0.5)
    scale_of = {}
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    named = dict(model.named_parameters())
    # embeddings: 0.5 ** 4, layer i: 0.5 ** (3 - i), pooler and classifier: 1
    assert scale_of[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(0.5**4)
    assert scale_of[id(named["bert.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(
        0.5**3
    )
    assert scale_of[id(named["bert.encoder.layer.2.output.dense.weight"])] == pytest.approx(0.5)
    assert scale_of[id(named["classifier.weight"])] == 1.0
    assert {g["name"] for g in optimizer.param_groups} >= {
        "layer_00.no_decay",
        "layer_03.decay",
        "layer_04.decay",
    }


def test_no_decay_can_be_switched_off():
    groups = param_groups(_tiny_bert(), weight_decay=0.01, no_decay=False)
    assert [g["name"] for g in groups] == ["decay"]


def test_lr_scaling_rule_counts_devices_nodes_and_accumulation():
    batch = global_batch_size(32, devices=2, num_nodes=2, accumulate_grad_batches=4)
    assert batch == 512
    assert scale_lr(0.1, batch, base_batch=256) == pytest.approx(0.2)
    assert scale_lr(1e-3, batch, base_batch=128, rule="sqrt") == pytest.approx(2e-3)
    assert scale_lr(0.1, batch, rule="none") == 0.1


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: scale_lr(0.1, 256, rule="cubic"), r"rule: unknown value 'cubic'"),
        (lambda: scale_lr(-0.1, 256), r"base_lr: got -0.1"),
        (lambda: global_batch_size(0), r"batch_size: got 0; allowed: an integer >= 1"),
        (lambda: global_batch_size(8, devices=0), r"devices: got 0"),
        (
            lambda: global_batch_size(8, accumulate_grad_batches=1.5),
            r"accumulate_grad_batches: got 1.5",
        ),
        (
            lambda: build_optimizer("adam", [nn.Parameter(torch.zeros(1))], layer_decay=0.8),
            r"layer_decay: needs a model",
        ),
    ],
)
def test_bad_input_names_the_parameter(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_list_command_prints_both_tables(capsys):
    out = subprocess.run(
        [sys.executable, "-m", "optim_callbacks", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "adabelief" in out and "torch.optim.AdamW" in out and "eps=1e-08" in out
    assert "cosine_restarts" in out and "warmup" in out
    with pytest.raises(SystemExit) as bad:  # argparse's usage error, in this process
        list_command(["lst"])
    assert bad.value.code == 2 and "invalid choice: 'lst'" in capsys.readouterr().err
