"""Train the demo CNN on the generated data set with the Logger."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..training.logger import Logger
from .data import MEAN, STD, make_images, normalize
from .model import SmallCNN


def train(
    run_dir: str | Path,
    steps: int = 300,
    size: int = 32,
    batch: int = 64,
    log=print,
    **logger_options,
) -> Logger:
    """Train for `steps` steps, logging on the default schedule with a probe set; returns the
    closed Logger."""
    torch.manual_seed(0)
    images, labels = make_images(2048, size, seed=0)
    inputs = normalize(images)
    model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(1)
    start = time.monotonic()
    options = {"probe": inputs[:128], "normalize": (MEAN, STD), **logger_options}
    with Logger(run_dir, model, inputs[:8], **options) as logger:
        for step in range(steps + 1):
            logger.log(step)
            if step == steps:
                break
            index = torch.randint(0, len(inputs), (batch,), generator=order)
            loss = nn.functional.cross_entropy(model(inputs[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0:
                log(f"step {step:4d}  loss {loss.item():.3f}")
    log(
        f"trained {steps} steps in {time.monotonic() - start:.0f}s; logged steps "
        f"{logger.logged_steps} to {run_dir}"
    )
    return logger
