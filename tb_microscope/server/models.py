"""A render worker's loaded models, kept in the service's memory bound (in bytes), which the
runs' loaded programs share."""

from __future__ import annotations

import torch

from ..lru import LRU
from ..run import Run


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class DeviceModels:
    """A device's loaded models, in the memory cache shared with the runs' programs."""

    def __init__(self, device: torch.device, memory: LRU):
        self.device, self.memory = device, memory

    def get(self, run: Run, step: int) -> torch.nn.Module:
        key = ("model", run.id, step, run.snapshot_version(step), str(self.device))

        def load():
            model = run.load_model(step, self.device)
            return model, state_bytes(model)

        return self.memory.get_or_make(key, load)
