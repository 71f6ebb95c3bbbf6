"""How the engine computes: the precision (bf16 autocast or fp32) and the process-wide backend
switches (oneDNN, NNPACK, TF32) and memory order an optimization runs under (`Numerics`), applied
per block so that workers on several devices share the switches; chosen per device and model as
benchmarks/numerics.py measured (`default_numerics`), and fp32 where a model has an operation
without a lower-precision kernel (`usable_numerics`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..nodes import Node
from ..run import Run
from .canvas import grey_image
from .param import InputSpace
from .tap import NodeTap


@dataclass(frozen=True)
class Numerics:
    """How the engine computes, per device (`benchmarks/numerics.py` measures each choice for
    speed and for batch invariance: a unit's picture alone and among others must agree).

    `onednn`: the CPU's convolutions from oneDNN rather than PyTorch's own; `nnpack`: NNPACK's
    for batches of 16 and more (PyTorch's default when oneDNN is off); `channels_last`: the
    input in N x H x W x C memory order; `autocast`: a lower-precision dtype (bf16);
    `tf32`: TF32 matrix products on CUDA."""

    onednn: bool = False
    nnpack: bool = False
    channels_last: bool = False
    autocast: torch.dtype | None = None
    tf32: bool = False

    def _switch(self, device: torch.device) -> Callable[[], None]:
        """Sets the process-wide switches these numerics need on `device`; returns what puts
        them back."""
        if device.type == "cuda":
            return cuda_tf32(self.tf32)
        # set_flags with only `enabled`: torch.backends.mkldnn.flags() also sets oneDNN's TF32
        # switch, which makes this CPU build print a warning about Intel GPUs.
        previous = torch.backends.mkldnn.set_flags(self.onednn, _fp32_precision=None)
        nnpack = torch.backends.nnpack.set_flags(self.nnpack)

        def restore() -> None:
            torch.backends.nnpack.set_flags(*nnpack)
            torch.backends.mkldnn.set_flags(previous[0], _fp32_precision=None)

        return restore

    def _switches(self, device: torch.device) -> tuple:
        return (self.tf32,) if device.type == "cuda" else (self.onednn, self.nnpack)

    @contextmanager
    def applied(self, device: torch.device) -> Iterator[None]:
        """These numerics while the block runs. The switches are process-wide, so workers on
        several devices share them: the first to enter sets them, the last to leave puts them
        back, and one that needs other switches waits until nobody uses the current ones."""
        kind = "cuda" if device.type == "cuda" else "cpu"
        switches = self._switches(device)
        with _SWITCHES:
            while _IN_USE[kind]["count"] and _IN_USE[kind]["switches"] != switches:
                _SWITCHES.wait()
            if not _IN_USE[kind]["count"]:
                _IN_USE[kind].update(switches=switches, restore=self._switch(device))
            _IN_USE[kind]["count"] += 1
        try:
            with torch.autocast(kind, dtype=self.autocast, enabled=bool(self.autocast)):
                yield  # autocast is per thread
        finally:
            with _SWITCHES:
                _IN_USE[kind]["count"] -= 1
                if not _IN_USE[kind]["count"]:
                    _IN_USE[kind]["restore"]()
                    _SWITCHES.notify_all()


def cuda_tf32(allow: bool) -> Callable[[], None]:
    """TF32 on or off for CUDA's matrix products and cuDNN's convolutions and RNNs; returns what
    puts them back. Through each backend's `fp32_precision` where torch has it: a process that
    set those (torch's advice) can no longer read the old `allow_tf32` switches (torch raises),
    and setting the old ones would lose a `torch.set_float32_matmul_precision("medium")`."""
    switches = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    try:
        previous = [switch.fp32_precision for switch in switches]
    except AttributeError:  # a torch before fp32_precision
        return _old_cuda_tf32(allow)

    def restore() -> None:
        for switch, precision in zip(switches, previous):
            switch.fp32_precision = precision

    try:
        for switch in switches:
            switch.fp32_precision = "tf32" if allow else "ieee"
    except RuntimeError:  # a torch whose fp32_precision knows no "ieee" yet
        restore()
        return _old_cuda_tf32(allow)
    return restore


def _old_cuda_tf32(allow: bool) -> Callable[[], None]:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow

    def restore() -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    return restore


_SWITCHES = threading.Condition()  # guards _IN_USE: the numerics switches in use per device kind
_IN_USE = {kind: {"count": 0, "switches": None, "restore": None} for kind in ("cpu", "cuda")}


def default_numerics(device: torch.device, model: nn.Module | None = None) -> Numerics:
    """The fastest choice that keeps pictures batch-invariant, as measured by
    benchmarks/numerics.py (the README's numerics table).

    On a CPU with AVX512-BF16 (with or without AMX), a `model` with more than one convolution
    kernel runs under bf16 autocast with oneDNN's convolutions and channels-last input: each
    sample computed alike at every batch size, and 2x to 8x faster than in fp32 (depthwise
    convolutions most). On an AMX Xeon, PyTorch's own fp32 convolutions did not compute a sample
    alike at every batch size either (36 levels apart on GoogLeNet with 2 threads), where bf16
    with oneDNN did, 3.9x faster. Transformers, whose one kernel is a
    patch embedding, stay in fp32: torchvision's ViT-B took 1.7x longer in bf16 (its attention
    copies its bf16 inputs around), other ViTs gained 1.1x to 1.3x. Otherwise on the CPU:
    PyTorch's own convolutions without NNPACK. oneDNN's fp32 kernels, and NNPACK's (PyTorch's
    choice for batches of 16 and more when oneDNN is off), compute a sample differently by
    batch size (1e-5 apart), which 32 iterations amplify to pictures 4 to 9 levels apart on
    average; PyTorch's own compute each sample alike. On CUDA (not measured yet): bf16
    autocast and channels-last."""
    if device.type == "cuda":
        return Numerics(channels_last=True, autocast=torch.bfloat16)
    if model is not None and cpu_has_bf16() and convolution_kernels(model) > 1:
        return Numerics(onednn=True, channels_last=True, autocast=torch.bfloat16)
    return Numerics()


# per model: the numerics it can run under, per node, size and device
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def usable_numerics(
    model: nn.Module, run: Run, node: Node, size: int, device: torch.device
) -> Numerics:
    """`default_numerics`, unless the model has an operation without a kernel for its lower
    precision on this device (an antialiased resize has no bf16 one on the CPU): then fp32.
    Found by one image's forward and backward to the node; remembered per model, node and
    size."""
    chosen = default_numerics(device, model)
    if not chosen.autocast:
        return chosen
    key = ("numerics", node.name, node.calls, size, str(device))
    known = _MEASURED.setdefault(model, {})
    if key not in known:
        x = grey_image(model, run, size, device)
        try:
            with chosen.applied(device):
                maps = NodeTap(model, node)(InputSpace(run.input_spec, device)(x)).maps
                maps.float().sum().backward()
            known[key] = chosen
        except RuntimeError as e:  # NotImplementedError among them
            if str(chosen.autocast).removeprefix("torch.") not in str(e).lower():
                raise
            known[key] = Numerics()
    return known[key]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, and AMX where it has it: both
    measured batch-invariant with oneDNN) and oneDNN is there to use it."""
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(native and torch.backends.mkldnn.is_available())


def convolution_kernels(model: nn.Module) -> int:
    """How many of `model`'s weights are convolution kernels (three or more dimensions)."""
    return sum(
        1 for name, p in model.named_parameters() if name.endswith("weight") and p.dim() >= 3
    )
