"""Node discovery on models of shapes no other test names: every module the forward pass calls is
a node or named, with its reason, in the discovery's note."""

import pytest
import torch
from torch import nn

import tb_microscope
from tb_microscope.capture import discover_nodes
from tb_microscope.nodes import CHANNELS_FIRST, CHANNELS_LAST, TOKENS, VECTOR


class FixedSizeFaceNet(nn.Module):
    """A 48 px face detector's shape: conv, PReLU, ceil-mode max-pool three times, then a linear
    head after a permute (it takes no other input size)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 8, 3), nn.PReLU(8)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(8, 16, 3), nn.PReLU(16)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(16, 16, 3), nn.PReLU(16)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(16, 32, 2), nn.PReLU(32)
        self.dense5, self.prelu5 = nn.Linear(32 * 9, 64), nn.PReLU(64)
        self.face, self.box = nn.Linear(64, 2), nn.Linear(64, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.face(x), self.box(x)


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.softmax, self.attn_drop = nn.Softmax(-1), nn.Dropout(0.1)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attn_drop(self.softmax(q @ k.transpose(-1, -2)))
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, d))


class FixedSizeViT(nn.Module):
    """Sixteen patch tokens and no class token: its attention map, heads x 16 x 16, has the shape
    of a 16 x 16 feature map of its 32 px input; position embeddings fix the input size."""

    def __init__(self, prefix=0):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, prefix, 16))
        self.pos = nn.Parameter(torch.randn(1, 16 + prefix, 16))
        self.pos_drop, self.attn, self.norm = nn.Dropout(0.1), Attention(), nn.Identity()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = self.pos_drop(torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos)
        return self.head(self.norm(self.attn(t)).mean(1))


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


def test_the_logged_run_lists_every_node_and_notes_the_rest(tmp_path):
    model, x = FixedSizeViT(1), torch.rand(2, 3, 32, 32)
    with tb_microscope.Logger(tmp_path, model, x, every=1) as logger:
        logger.log(0)
    run = tb_microscope.open_run(tmp_path)
    assert [n.name for n in run.nodes] == ["patch", "attn", "attn.qkv", "attn.proj", "head"]
    note = run.manifest.model.architecture.note
    assert "pos_drop, attn.attn_drop, norm" in note and "attn.softmax" in note
