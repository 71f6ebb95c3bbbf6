"""Logs tiny models of architecture families (random weights) for two steps each, as a
training script would, into LOGDIR/FAMILY; prints, per family, how long the first log() and
the whole capture took, as JSON lines.

    python log_family.py LOGDIR FAMILY [FAMILY ...]
"""

import json
import sys
import time

import torch
from torch import nn

import tb_microscope


def tiny_cnn(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )


def build(family: str) -> tuple[nn.Module, torch.Tensor]:
    """The model and an example batch (N x C x H x W) of the family, tiny."""
    x = torch.rand(4, 3, 32, 32)
    if family == "tv_resnet":
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5), x
    if family == "tv_convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5), x
    if family == "tv_swin":
        from torchvision.models import SwinTransformer

        model = SwinTransformer([4, 4], 16, [2, 2], [2, 2], [4, 4], num_classes=5)
        return model, x
    if family == "tv_vit":
        from torchvision.models import VisionTransformer

        return VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=5), x
    if family.startswith("timm_"):
        import timm

        options = {
            "timm_vit": (
                "vit_tiny_patch16_224",
                dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2),
            ),
            "timm_convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48))),
            "timm_efficientnet": ("efficientnet_b0", {}),
        }[family]
        return timm.create_model(options[0], pretrained=False, num_classes=5, **options[1]), x
    if family.startswith("hf_"):
        import transformers as hf

        if family == "hf_vit":
            config = hf.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=5,
            )
            return hf.ViTForImageClassification(config), x
        if family == "hf_convnext":
            config = hf.ConvNextConfig(
                hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5
            )
            return hf.ConvNextForImageClassification(config), x
        if family == "hf_swin":
            config = hf.SwinConfig(
                image_size=32,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 2],
                window_size=4,
                num_labels=5,
            )
            return hf.SwinForImageClassification(config), x
        if family == "hf_dinov2":
            config = hf.Dinov2Config(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                mlp_ratio=2,
                num_labels=5,
            )
            return hf.Dinov2ForImageClassification(config), x
        if family == "hf_resnet":
            config = hf.ResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5
            )
            return hf.ResNetForImageClassification(config), x
    if family == "gray_cnn":
        return tiny_cnn(1), torch.rand(4, 1, 32, 32)
    if family == "six_band_cnn":
        return tiny_cnn(6), torch.rand(4, 6, 32, 32)
    raise SystemExit(f"unknown family {family}")


def log(family: str, run_dir: str) -> dict:
    torch.manual_seed(0)
    model, example = build(family)
    logger = tb_microscope.Logger(run_dir, model, example, steps=[0, 1], probe=example)
    start = time.perf_counter()
    logger.log(0)
    first_log = time.perf_counter() - start
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    logger.log(1)
    logger.close()  # waits for the capture
    return {"family": family, "first_log_s": first_log, "captured_s": time.perf_counter() - start}


if __name__ == "__main__":
    for name in sys.argv[2:]:
        print(json.dumps(log(name, f"{sys.argv[1]}/{name}")), flush=True)
