"""A render worker's loaded models, kept in the service's memory bound (in bytes), which the
runs' loaded programs share."""

from __future__ import annotations

import torch

from ..lru import LRU
from ..run import Run


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class DeviceModels:
    """One worker's loaded models on its device, in the memory cache shared with the runs'
    programs. Each worker loads its own instances (`worker` is in their keys): the node tap's
    hooks and attribution's swapped submodules are per call, so a module must never be used
    by two threads at once."""

    def __init__(self, device: torch.device, memory: LRU, worker: int = 0):
        self.device, self.memory, self.worker = device, memory, worker

    def get(self, run: Run, step: int) -> torch.nn.Module:
        key = ("model", run.id, step, run.snapshot_version(step), str(self.device), self.worker)

        def load():
            model = run.load_model(step, self.device)
            return model, state_bytes(model)

        return self.memory.get_or_make(key, load)
