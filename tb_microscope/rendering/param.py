"""The image parameterization: what the optimizer changes, and how it becomes the model's input.

lucid's recipe, in our own code: each image is a spectrum in Fourier space, scaled so that low
frequencies dominate, with its three colours decorrelated; every iteration it is warped by
random transforms (pad, jitter, scale, rotate) and mapped into the value range and
normalization the model was trained with. Everything random is drawn from per-image seeds, so
an image never depends on which others share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MicroscopeError
from ..run import Run

# lucid's standard transforms: pad 12, jitter 8, scale 0.9-1.1, rotate ±10°, jitter 4, in pixels
# of lucid's 128 px images. A model that takes only a small input gets them in proportion to the
# image that fits in it (see `Canvas.strength`).
PAD = 12
JITTERS = (8, 4)
REFERENCE_SIZE = 128
SCALES = torch.tensor([1 + (i - 5) / 50 for i in range(11)])
ANGLES = torch.tensor(list(range(-10, 11)) + [0] * 5, dtype=torch.float32)

# The square root of ImageNet's RGB colour covariance (its singular vectors scaled by the square
# roots of their singular values), as lucid publishes it (lucid/optvis/param/color.py), divided
# by its largest column norm so that no colour direction grows beyond the unit range. An image
# optimized in these decorrelated coordinates is multiplied by it to become RGB.
_COLOUR_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)
COLOUR_CORRELATION = _COLOUR_SVD_SQRT / np.linalg.norm(_COLOUR_SVD_SQRT, axis=0).max()


def frequency_grid(height: int, width: int) -> np.ndarray:
    """The magnitude of each frequency of a real 2-D FFT of height x width (the layout of
    `torch.fft.rfft2`: height x (width // 2 + 1)), in cycles per pixel."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)


class InputSpace:
    """Maps images in [0, 1] to what the model was fed in training (value range, mean/std)."""

    def __init__(self, spec: dict, device: torch.device):
        lo, hi = spec.value_range
        self.lo, self.span = lo, hi - lo
        self.channels = spec.channels
        norm = spec.normalize
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(norm["mean"], device=device).view(shape) if norm else None
        self.std = torch.tensor(norm["std"], device=device).view(shape) if norm else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = self.lo + self.span * images
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


class FourierImages:
    """lucid's image parameterization for a batch: one spectrum per image, seeded per image.

    Each image is its own tensor, made into pixels on its own and stepped by the optimizer on
    its own: PyTorch's element-wise kernels compute the values past the last whole vector of a
    tensor with scalar code, which rounds some functions (sigmoid, Adam's arithmetic)
    differently, so in one tensor for the batch an image whose size is not a whole number of
    vectors (3 x 26 x 26 values) would change with its place in the batch."""

    def __init__(self, seeds: Sequence[int], channels: int, size: int, device: torch.device):
        freqs = frequency_grid(size, size)
        shape = (1, channels, *freqs.shape, 2)
        self.spectra = [
            (torch.randn(shape, generator=torch.Generator().manual_seed(s)) * 0.01)
            .to(device)
            .requires_grad_(True)
            for s in seeds
        ]
        scale = 1.0 / np.maximum(freqs, 1.0 / size)
        self.scale = torch.tensor(scale, dtype=torch.float32, device=device)[None, None, ..., None]
        self.size = size
        self.colour = torch.tensor(COLOUR_CORRELATION.T, device=device) if channels == 3 else None

    def image(self, spectrum: torch.Tensor) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.scale * spectrum)
        image = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho") / 4.0
        if self.colour is not None:
            image = torch.einsum("nchw,cd->ndhw", image, self.colour)
        return torch.sigmoid(image)

    def __call__(self) -> torch.Tensor:
        return torch.cat([self.image(spectrum) for spectrum in self.spectra])


class RandomTransforms:
    """lucid's standard transforms as one affine warp per sample, drawn from per-image seeds.

    Every random number a sample sees at every iteration is drawn up front from its own
    generator. The output canvas (height, width) holds the image in its middle, grey around it.
    `strength` scales the jitters (lucid's pixels at 1).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        iterations: int,
        size: int,
        canvas: tuple[int, int],
        device: torch.device,
        strength: float = 1.0,
    ):
        draws, (big, small) = [], JITTERS
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            first = (torch.randint(0, big, (iterations, 2), generator=g) - big // 2) * strength
            second = (torch.randint(0, small, (iterations, 2), generator=g) - small // 2) * strength
            scale = SCALES[torch.randint(0, len(SCALES), (iterations,), generator=g)]
            angle = ANGLES[torch.randint(0, len(ANGLES), (iterations,), generator=g)]
            draws.append(torch.cat([first, second, scale[:, None], angle[:, None]], 1))
        self.draws = torch.stack(draws, 1).float().to(device)  # iterations x N x 6
        self.size, self.canvas = size, canvas

    def theta(self, iteration: int) -> torch.Tensor:
        """Affine maps from canvas coordinates to image coordinates (both normalized)."""
        d = self.draws[iteration]
        t1, t2, s, a = d[:, 0:2], d[:, 2:4], d[:, 4], d[:, 5] * (math.pi / 180)
        cos, sin = torch.cos(a), torch.sin(a)
        rot_inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
        height, width = self.canvas
        span = torch.tensor([width, height], dtype=s.dtype, device=s.device)  # x, then y
        linear = rot_inv * span[None, None, :] / (self.size * s)[:, None, None]
        shift = -(2 / self.size) * (torch.einsum("nij,nj->ni", rot_inv, t2) / s[:, None] + t1)
        return torch.cat([linear, shift[:, :, None]], 2)

    def __call__(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        n, c = images.shape[:2]
        grid = F.affine_grid(self.theta(iteration), [n, c, *self.canvas], align_corners=False)
        warped = F.grid_sample(
            images - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return warped + 0.5


def centred(images: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Images placed in the middle of a grey canvas (height, width), no random transform."""
    (height, width), size = canvas, images.shape[-1]
    top, left = (height - size) // 2, (width - size) // 2
    return F.pad(images, [left, width - size - left, top, height - size - top], value=0.5)


@dataclass(frozen=True)
class Canvas:
    """Where a render happens: the model's input (height, width), and the side of the square
    image optimized in its middle. A model that takes any size gets the requested size padded
    by PAD; one that takes only some sizes gets the nearest it takes, and the image is shown at
    the requested size afterwards. `padded`: the final image is measured in its canvas (the
    model does not take the image alone). `strength`: lucid's pad and jitters scaled to the
    image, below 1 only where an input under 152 px leaves no room for them (a CIFAR model's
    32 px: a 26 px image with 2 px of pad rather than an 8 px one with 12)."""

    input: tuple[int, int]
    image: int
    padded: bool
    strength: float = 1.0


def canvas_for(run: Run, size: int) -> Canvas:
    height, width = run.input_spec.dim("height"), run.input_spec.dim("width")
    if height is None or width is None:
        raise MicroscopeError(f"run '{run.name}' has no image input (N x C x H x W)")
    if height["size"] is not None or width["size"] is not None:  # runs at one size only
        return _fixed_canvas((height["size"] or height["min"], width["size"] or width["min"]))
    least = max(height["min"] or 1, width["min"] or 1)
    most = min(height["max"] or 1 << 30, width["max"] or 1 << 30)
    side = min(max(size + 2 * PAD, least), most)  # the sizes the model takes
    if side != size + 2 * PAD:
        return _fixed_canvas((side, side))
    return Canvas((side, side), size, size < least)


def _fixed_canvas(input_size: tuple[int, int]) -> Canvas:
    side = min(input_size)
    if side - 2 * PAD >= REFERENCE_SIZE:
        return Canvas(input_size, side - 2 * PAD, True)
    # The largest image that fits with a pad in proportion to it.
    fits = [i for i in range(8, side) if i + 2 * round(PAD * i / REFERENCE_SIZE) <= side]
    image = max(fits, default=side)
    return Canvas(input_size, image, True, image / REFERENCE_SIZE)
