"""Node discovery on models of shapes no other test names: every module the forward pass calls is
a node or named, with its reason, in the discovery's note."""

import pytest
import torch
from torch import nn

from conftest import FixedSizeFaceNet, FixedSizeViT
from tb_microscope.nodes import CHANNELS_FIRST, CHANNELS_LAST, TOKENS, VECTOR, layout_of
from tb_microscope.training.capture import discover_nodes

CF, CL = CHANNELS_FIRST, CHANNELS_LAST


def _called(model, x):
    called = []
    hooks = [
        m.register_forward_pre_hook(lambda *_, n=name: called.append(n))
        for name, m in model.named_modules()
        if name
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(called))


def test_a_fixed_size_cnn_lists_every_module_it_runs():
    model, x = FixedSizeFaceNet(), torch.rand(2, 3, 48, 48)
    found = discover_nodes(model, x)
    assert [n.name for n in found.nodes] == _called(model, x)
    layouts = {n.name: n.layout for n in found.nodes}
    assert {layouts[f"{k}{i}"] for k in ("conv", "prelu", "pool") for i in (1, 2, 3)} == {
        CHANNELS_FIRST
    }
    assert layouts["dense5"] == VECTOR and found.note is None


@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_attention_maps_and_pass_through_modules_are_left_out_and_named(prefix):
    model, x = FixedSizeViT(prefix), torch.rand(2, 3, 32, 32)
    found = discover_nodes(model, x)
    names = [n.name for n in found.nodes]
    assert names == ["patch", "attn", "attn.qkv", "attn.proj", "head"]
    assert found.nodes[1].layout == TOKENS and found.nodes[1].prefix == prefix
    assert found.left_out == {
        "whose output is their input in eval mode": ["pos_drop", "attn.attn_drop", "norm"],
        "whose output is no feature map, tokens or vector": ["attn.softmax"],
    }
    # every called module is a node or named in the note, with its reason
    for name in set(_called(model, x)) - set(names):
        assert name in found.note
    assert "Softmax ×1: attn.softmax 2×" in found.note and "Dropout ×2" in found.note


def test_channels_last_maps_of_a_fixed_size_model_are_found_by_their_gradients():
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 12, 4, 4)
            self.mix = nn.Linear(12, 12)
            self.head = nn.Linear(12 * 8 * 8, 3)

        def forward(self, x):
            y = self.mix(self.stem(x).permute(0, 2, 3, 1))  # N x 8 x 8 x 12
            return self.head(y.flatten(1))

    found = discover_nodes(ChannelsLast(), torch.rand(2, 3, 32, 32))
    layouts = {n.name: (n.layout, n.units) for n in found.nodes}
    assert layouts == {
        "stem": (CHANNELS_FIRST, 12),
        "mix": (CHANNELS_LAST, 12),
        "head": (VECTOR, 3),
    }


@pytest.mark.parametrize(
    "shape, size, shape2, size2, expected",
    [
        ((64, 56, 56), (224, 224), (64, 64, 72), (256, 288), (CF, 64, 0)),
        ((56, 56, 96), (224, 224), (64, 72, 96), (256, 288), (CL, 96, 0)),
        ((197, 768), (224, 224), (1 + 16 * 18, 768), (256, 288), (TOKENS, 768, 1)),
        ((12, 197, 64), (224, 224), (12, 289, 64), (256, 288), None),  # per head
        ((12, 197, 197), (224, 224), (12, 289, 289), (256, 288), None),  # attention map
        ((256, 1, 1), (224, 224), (256, 1, 1), (256, 288), (CF, 256, 0)),  # pooled
        ((14, 14, 96), (224, 224), None, None, (CL, 96, 0)),  # a fixed-size model
        ((12, 197, 64), (224, 224), None, None, None),
        ((261, 384), (224, 224), None, None, (TOKENS, 384, 5)),  # class + 4 registers
        ((10,), (224, 224), None, None, (VECTOR, 10, 0)),
    ],
)
def test_layouts_follow_the_input_size_not_the_shape(shape, size, shape2, size2, expected):
    assert layout_of(shape, size, shape2, size2) == expected
