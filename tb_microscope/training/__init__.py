"""The training side: the `Logger` (`logger.py`), its background writer (`writer.py`), the
TensorBoard events that mark each snapshot (`summary.py`), snapshot schedules (`schedule.py`)
and architecture capture (`capture/`). It writes through `store` and imports nothing that
renders or serves.
"""

from .logger import Logger, SnapshotWriteError
from .schedule import make_schedule

__all__ = ["Logger", "SnapshotWriteError", "make_schedule"]
