"""A generated image data set (nothing is downloaded): stripes, blobs, checkerboards, in classes.

Four classes: horizontal stripes, vertical stripes, a red blob, a blue blob; each image has a
random stripe period or blob position, and noise.
"""

from __future__ import annotations

import math

import torch

CLASSES = ["horizontal stripes", "vertical stripes", "red blob", "blue blob"]
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def make_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (N x 3 x size x size, values in [0, 1]) and their class labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.rand(n, 3, size, size, generator=generator) * 0.2
    for i, label in enumerate(labels.tolist()):
        period = 4 + 4 * torch.rand(1, generator=generator).item()
        if label < 2:
            coord = ys if label == 0 else xs
            images[i] += 0.5 + 0.5 * torch.sin(2 * math.pi * coord / period)
        else:
            cy, cx = (torch.rand(2, generator=generator) * size).tolist()
            blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (size / 6) ** 2))
            images[i, 0 if label == 2 else 2] += blob
    return images.clamp(0, 1), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """What the demo model is fed: (image - MEAN) / STD."""
    shape = (1, -1, 1, 1)
    return (images - torch.tensor(MEAN).view(shape)) / torch.tensor(STD).view(shape)
