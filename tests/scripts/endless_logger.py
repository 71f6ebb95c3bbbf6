"""Logs a 128 MB model at every step until killed (for the kill-mid-snapshot tests):
`endless_logger.py LOGDIR [BACKLOG_MB]`."""

import sys

import torch
from torch import nn

import tb_microscope


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 4096))


if __name__ == "__main__":
    net = model()
    options = {"backlog_mb": float(sys.argv[2])} if len(sys.argv) > 2 else {}
    logger = tb_microscope.Logger(sys.argv[1], net, torch.rand(2, 4096), **options)
    step = 0
    while True:
        logger.log(step, force=True)
        with torch.no_grad():
            net[0].bias += 1
        print(f"step {step}", flush=True)
        step += 1
