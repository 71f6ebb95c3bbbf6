"""The redirected ReLU gradient (lucid's): while an optimization starts, a ReLU (or ReLU6) that
would block a sample's whole gradient lets through the part that pushes its negative inputs up, so
that a unit silent on the starting noise, common in small models, still gets a picture.
`RedirectedReLUs` puts `_RedirectedReLU` in place of every ReLU of a forward pass for the first
REDIRECT_ITERATIONS iterations; each sample is decided alone, so batch-mates never interact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

REDIRECT_ITERATIONS = 16  # lucid's: ReLU gradients are redirected for the first 16 iterations


class _RedirectedReLU(torch.autograd.Function):
    """ReLU (or, with `high`, a ReLU capped there: MobileNets' ReLU6) whose backward, for a
    sample whose gradient it would block entirely, lets through the gradient that pushes inputs
    below zero up. Decided per sample, so batch-mates never interact."""

    @staticmethod
    def forward(ctx, x, forced, high=None):
        out = x.clamp_min(0) if high is None else x.clamp(0, high)
        ctx.save_for_backward(out)
        ctx.forced = forced if forced is not None and len(forced) == len(x) else None
        ctx.high = high
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        if ctx.high is None:
            passed = torch.ops.aten.threshold_backward(grad, out, 0)  # ReLU's own gradient
            return _redirected(ctx, grad, passed, None), None, None
        passed = torch.ops.aten.hardtanh_backward(grad, out, 0.0, ctx.high)  # ReLU6's own
        # raising an input above `high` changes nothing: below zero only
        return _redirected(ctx, grad, passed, out <= 0), None, None


def _redirected(ctx, grad, passed, below):
    # A sample is blocked when none of its gradient passes; then its inputs below the range pass
    # the gradient that raises them too (the loss is minimized: a negative gradient).
    # abs().amax() is the cheapest per-sample test on the CPU (boolean reductions are several
    # times slower, and a flatten copies a channels-last tensor); there, the rare blocked case
    # is only computed when it occurs.
    level = passed.abs()
    if level.dim() > 1:  # reduced over the sample's values in their memory order: no copy
        level = level.amax(dim=tuple(range(1, level.dim())))
    blocked = level == 0
    if ctx.forced is not None:
        blocked = blocked | ctx.forced
    if grad.device.type == "cpu" and not bool(blocked.any()):
        return passed
    redirect = blocked.view(-1, *[1] * (grad.dim() - 1)) & (grad <= 0)
    if below is not None:
        redirect &= below
    return torch.where(redirect, grad, passed)


_RELUS = {
    torch.relu,
    F.relu,
    torch.ops.aten.relu.default,
    torch.relu_,
    F.relu_,
    torch.ops.aten.relu_.default,
}
_HARDTANHS = {F.hardtanh, torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default}


def _relu6_input(func, args, kwargs) -> torch.Tensor | None:
    """The input of a hardtanh call that is a ReLU6 (from 0 to 6), else None."""
    if func is F.relu6:
        return args[0] if args else kwargs["input"]
    if func not in _HARDTANHS:
        return None
    names = ("input" if func is F.hardtanh else "self", "min_val", "max_val")
    given = dict(zip(names, args)) | kwargs
    if given.get("min_val", -1.0) == 0 and given.get("max_val", 1.0) == 6:
        return given[names[0]]
    return None


class RedirectedReLUs(TorchFunctionMode):
    """Every ReLU (and ReLU6) of the forward pass as `_RedirectedReLU`. An in-place one becomes
    out-of-place: exported graphs use its result, not its mutated input.

    `forced` (one flag per image) redirects an image's gradient at every ReLU of its batch size,
    blocked or not: for a unit whose only activity the image cannot change, so that its image
    got no gradient at all (a first-layer unit that fires only where the convolution's zero
    padding meets the grey canvas, and nowhere on the image)."""

    def __init__(self, forced: torch.Tensor | None = None):
        super().__init__()
        self.forced = forced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            if func in _RELUS:
                x = args[0] if args else kwargs["input"]
                return _RedirectedReLU.apply(x, self.forced)
            x = _relu6_input(func, args, kwargs)
            if x is not None:
                return _RedirectedReLU.apply(x, self.forced, 6.0)
        return func(*args, **kwargs)
