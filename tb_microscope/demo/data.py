"""A generated image data set (nothing is downloaded), rich enough for varied features.

Nine classes: stripes at three orientations and checkerboards (random period, phase and colour
pair), red, green and blue blobs, and two simple shapes, filled discs and squares of a random
colour with sharp edges. Every image has noise; positions, sizes and colours vary.
"""

from __future__ import annotations

import math

import torch

CLASSES = [
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "checkerboard",
    "red blob",
    "green blob",
    "blue blob",
    "disc",
    "square",
]
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


def make_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images (N x 3 x size x size, values in [0, 1]) and their class labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = torch.empty(n, 3, size, size)
    for i, label in enumerate(labels.tolist()):
        u = torch.rand(8, generator=g)
        a, b = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        if label < 4:  # two random colours in a periodic pattern
            period, phase = 4 + 5 * u[0].item(), 2 * math.pi * u[1].item()
            if label == 3:
                cell = torch.sin(math.pi * ys / period * 1.5 + phase) * torch.sin(
                    math.pi * xs / period * 1.5
                )
            else:
                coord = (ys, xs, (ys + xs) / math.sqrt(2))[label]
                cell = torch.sin(2 * math.pi * coord / period + phase)
            mix = (cell > 0).float()
            images[i] = a * mix + b * (1 - mix)
        else:
            cy, cx = (u[2:4] * 0.6 + 0.2).mul(size).tolist()
            radius = size * (0.15 + 0.15 * u[4].item())
            distance = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
            background = torch.rand(3, 1, 1, generator=g) * 0.4 + 0.1
            if label < 7:
                blob = torch.exp(-((distance / radius) ** 2))
                colour = torch.zeros(3, 1, 1)
                colour[label - 4] = 1.0
                images[i] = background * (1 - blob) + colour * blob
            else:
                if label == 7:
                    shape = distance < radius
                else:  # a square of the disc's area
                    half = radius * math.sqrt(math.pi) / 2
                    shape = ((ys - cy).abs() < half) & ((xs - cx).abs() < half)
                shape = shape.float()
                images[i] = background * (1 - shape) + a * shape
    images += 0.08 * torch.randn(images.shape, generator=g)
    return images.clamp(0, 1), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """What the demo model is fed: (image - MEAN) / STD."""
    shape = (1, -1, 1, 1)
    return (images - torch.tensor(MEAN).view(shape)) / torch.tensor(STD).view(shape)
