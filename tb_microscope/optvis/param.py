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
from ..limits import SettingError
from ..run import Run

# lucid's standard transforms: pad 12, jitter 8, scale 0.9-1.1, rotate ±10°, jitter 4, in pixels
# of lucid's 128 px images. A model that takes only a small input gets them in proportion to the
# image that fits in it (see `Canvas.strength`).
PAD = 12
JITTERS = (8, 4)
REFERENCE_SIZE = 128
SCALES = torch.tensor([1 + (i - 5) / 50 for i in range(11)], dtype=torch.float32)
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
    """Maps images in [0, 1] to what the model was fed in training (value range, mean/std), as
    one multiply and one add per value."""

    def __init__(self, spec: dict, device: torch.device):
        lo, hi = spec.value_range
        self.channels = spec.channels
        norm = spec.normalize or {"mean": [0.0], "std": [1.0]}
        mean = np.asarray(norm["mean"], dtype=np.float64)
        std = np.asarray(norm["std"], dtype=np.float64)
        gain, offset = (hi - lo) / std, (lo - mean) / std  # (lo + (hi - lo) x - mean) / std

        def per_channel(values: np.ndarray) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

        self.gain, self.offset = per_channel(gain), per_channel(offset)
        # the offset for images centred on grey (x - 0.5), as `RandomTransforms` gives them
        self.centred_offset = per_channel(offset + gain / 2)

    def __call__(self, images: torch.Tensor, centred: bool = False) -> torch.Tensor:
        """The model's input for `images` in [0, 1], or, `centred`, in [-0.5, 0.5]."""
        return images * self.gain + (self.centred_offset if centred else self.offset)


class FourierImages:
    """lucid's image parameterization for a batch: one spectrum per image, seeded per image.

    Each image's spectrum is its own tensor, which the optimizer steps on its own (its Adam
    kernel run on it alone), and the operations whose rounding can depend on where a value
    sits in a tensor are run image by image: the FFTs, the colour matrix (a matrix product)
    and the sigmoid (PyTorch's element-wise kernels compute the values past the last whole
    vector of a tensor with scalar code, which rounds sigmoid differently, so in one tensor for
    the batch an image of 3 x 26 x 26 values would change with its place in the batch).
    Everything else (the frequency scaling, the sigmoid's gradient) is additions and
    multiplications, rounded alike anywhere, and runs on the whole batch at once. The forward
    and backward are written out (`_Pixels`) so that the image-by-image steps write into one
    batch tensor, with no autograd bookkeeping per image.
    """

    def __init__(self, seeds: Sequence[int], channels: int, size: int, device: torch.device):
        freqs = frequency_grid(size, size)
        shape = (1, channels, *freqs.shape, 2)
        self.spectra = [
            (
                torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                * 0.01
            )
            .to(device)
            .requires_grad_(True)
            for s in seeds
        ]

        def per_frequency(values: np.ndarray) -> torch.Tensor:  # 1 x 1 x H x W' x 1
            return torch.tensor(values, dtype=torch.float32, device=device)[None, None, ..., None]

        scale = 1.0 / np.maximum(freqs, 1.0 / size)
        self.scale = per_frequency(scale)
        # The gradient of a real inverse FFT is the forward one with the frequencies that stand
        # for two (all but the first column and, for an even size, the last) counted twice, as
        # PyTorch's own backward of irfftn does; doubled in the scale (exactly: a power of two).
        doubled = np.ones(freqs.shape[1])
        doubled[1 : size - freqs.shape[1] + 1] = 2.0
        self.grad_scale = per_frequency(scale * doubled)
        self.size, self.channels = size, channels
        # lucid divides the image by 4 before its colours are mixed: exact in the matrix (a
        # power of two), one operation fewer
        colour = COLOUR_CORRELATION / 4.0  # RGB x decorrelated
        self.colour = (
            torch.tensor(colour, device=device, dtype=torch.float32) if channels == 3 else None
        )

    def __call__(self) -> torch.Tensor:
        """The images in [0, 1] (N x C x size x size)."""
        return _Pixels.apply(self, *self.spectra)

    def pixels(self, spectra: Sequence[torch.Tensor]) -> torch.Tensor:
        spectrum = torch.view_as_complex(torch.cat(spectra) * self.scale)
        side = (self.size, self.size)
        raw = spectrum.new_empty((len(spectra), self.channels, *side), dtype=torch.float32)
        for i in range(len(spectra)):
            torch.fft.irfftn(spectrum[i : i + 1], s=side, norm="ortho", out=raw[i : i + 1])
        mixed = self._mix(raw, self.colour)
        images = torch.empty_like(mixed)
        for i in range(len(spectra)):
            torch.sigmoid(mixed[i : i + 1], out=images[i : i + 1])
        return images

    def spectra_grads(self, grad: torch.Tensor, images: torch.Tensor) -> list[torch.Tensor]:
        """Each spectrum's gradient, given the images' (`grad`) and the images."""
        mixed = torch.ops.aten.sigmoid_backward(grad, images)
        raw = self._mix(mixed, None if self.colour is None else self.colour.T)
        spectrum = torch.empty(
            (len(raw), self.channels, *self.scale.shape[2:4]),
            dtype=torch.complex64,
            device=raw.device,
        )
        for i in range(len(raw)):
            torch.fft.rfftn(raw[i : i + 1], dim=(-2, -1), norm="ortho", out=spectrum[i : i + 1])
        return list((torch.view_as_real(spectrum) * self.grad_scale).split(1))

    def _mix(self, images: torch.Tensor, colour: torch.Tensor | None) -> torch.Tensor:
        """`images`' colours mixed by `colour` (or divided by 4 without one), image by image:
        a matrix product's rounding may depend on how many columns it is given."""
        if colour is None:
            return images * 0.25
        mixed = torch.empty_like(images)
        for i in range(len(images)):
            torch.mm(colour, images[i].view(3, -1), out=mixed[i].view(3, -1))
        return mixed


class _Pixels(torch.autograd.Function):
    """`FourierImages`' images from its spectra, with the gradient written out."""

    @staticmethod
    def forward(ctx, param: FourierImages, *spectra: torch.Tensor) -> torch.Tensor:
        images = param.pixels(spectra)
        ctx.param = param
        ctx.save_for_backward(images)
        return images

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (images,) = ctx.saved_tensors
        return (None, *ctx.param.spectra_grads(grad.contiguous(), images))


class RandomTransforms:
    """lucid's standard transforms as one affine warp per sample, drawn from per-image seeds.

    Every random number a sample sees at every iteration is drawn up front from its own
    generator, and every warp is computed then. The output canvas (height, width) holds the
    image in its middle, grey around it. `strength` scales the jitters (lucid's pixels at 1).

    Batch-invariant by construction: a sample's warp is made from its own draws with
    additions, multiplications and divisions alone (each rounded the same whether PyTorch's
    vector code or its scalar code for a tensor's last values computes it), the rotations'
    cosines and sines from a table Python computed.
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
            angle = torch.randint(0, len(ANGLES), (iterations,), generator=g)
            draws.append((first, second, scale, angle))
        first, second, scale, angle = (torch.stack(d, 1) for d in zip(*draws))  # iterations x N
        theta = _affine_maps(first.float(), second.float(), scale, angle, size, canvas)
        self.theta = theta.to(device)  # iterations x N x 2 x 3
        height, width = canvas
        # where affine_grid (align_corners=False) puts the canvas's pixel centres
        self.xs = ((torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1).to(device)
        self.ys = ((torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1).to(device)
        self.size, self.canvas = size, canvas

    def grid(self, iteration: int) -> torch.Tensor:
        """Each sample's sampling grid (N x H x W x 2) at `iteration`: what `F.affine_grid`
        gives for its map, as the sum of a term per column and a term per row."""
        theta = self.theta[iteration]  # N x 2 x 3
        along_x = self.xs[None, :, None] * theta[:, None, :, 0]  # N x W x 2
        along_y = self.ys[None, :, None] * theta[:, None, :, 1] + theta[:, None, :, 2]  # N x H x 2
        return along_y[:, :, None, :] + along_x[:, None, :, :]

    def __call__(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        """`images` (in [0, 1]) warped onto the canvas, centred on grey: in [-0.5, 0.5], 0
        where no image falls (`InputSpace(..., centred=True)` maps them on)."""
        return F.grid_sample(
            images - 0.5,
            self.grid(iteration),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )


_ANGLE_COS = torch.tensor([math.cos(math.radians(a)) for a in ANGLES.tolist()], dtype=torch.float32)
_ANGLE_SIN = torch.tensor([math.sin(math.radians(a)) for a in ANGLES.tolist()], dtype=torch.float32)


def _affine_maps(first, second, scale, angle, size: int, canvas: tuple[int, int]):
    """The affine maps (... x 2 x 3) from canvas coordinates to image coordinates (both
    normalized) of lucid's jitter `first`, scale, rotation by ANGLES[`angle`] and jitter
    `second` (pixels, ... x 2 for x and y)."""
    cos, sin = _ANGLE_COS[angle], _ANGLE_SIN[angle]
    height, width = canvas
    x_span, y_span = width / (size * scale), height / (size * scale)
    # the inverse rotation, its columns scaled by the canvas's extent over the scaled image's
    linear = torch.stack(
        [
            torch.stack([cos * x_span, sin * y_span], -1),
            torch.stack([-sin * x_span, cos * y_span], -1),
        ],
        -2,
    )
    tx, ty = second[..., 0], second[..., 1]
    shift = torch.stack(
        [
            (cos * tx + sin * ty) / scale + first[..., 0],
            (cos * ty - sin * tx) / scale + first[..., 1],
        ],
        -1,
    ) * (-2 / size)
    return torch.cat([linear, shift[..., None]], -1)


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


def display_bands(channels: int, bands: Sequence[int] | None) -> list[int] | None:
    """Which of an image's channels are shown as red, green and blue: None for grey (one
    channel) and RGB as it is; else `bands`, by default the first three."""
    if channels == 1 or (channels == 3 and bands is None):
        return None
    chosen = list(bands) if bands is not None else [0, 1, min(2, channels - 1)]
    if len(chosen) != 3 or not all(isinstance(b, int) and 0 <= b < channels for b in chosen):
        raise SettingError(
            f"bands must be three channel indexes from 0 to {channels - 1}, got {bands!r}"
        )
    return chosen
