"""Logs step 0, then hits a file size limit (EFBIG, as a full disk would fail) for steps 1-3.

Usage: python limited_disk.py RUN_DIR [--strict]
"""

import resource
import signal
import sys

import torch
from torch import nn

import tb_microscope

if __name__ == "__main__":
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.rand(8, 512)
    logger = tb_microscope.Logger(sys.argv[1], net, x, strict="--strict" in sys.argv)
    logger.log(0)
    logger.flush()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    for step in range(1, 4):
        logger.log(step, force=True)
        loss = net(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logger.close()
    print("finished training", flush=True)
