"""What a device's memory says: how many bytes it can still give (`free_memory`), and whether
an error means it ran out (`is_out_of_memory`), which the engine answers by halving its batch and
`fitted_canvas` does not mistake for a side the model refuses.
"""

from __future__ import annotations

import torch


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: CUDA's free memory plus what PyTorch holds unused;
    on the CPU, Linux's MemAvailable. None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory (CUDA's error or the CPU's)."""
    text = str(error)
    cpu_words = "can't allocate memory"
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or cpu_words in text
