"""Running render work: the planner (`planner.py`: runs x steps x nodes x units x technique into
groups, minus what the cache holds), the executors behind one protocol (`executors.py`: in this
process; `ray_executor.py`: on a Ray cluster) and the render cache with its disk budget
(`cache.py`). The CLI, the demo and the plugin's render service all take this road.
"""

from .cache import DiskBudget, RenderCache, RenderKey, ResultKey
from .executors import Executor, InProcessExecutor
from .planner import Group, Settings, plan, render_cached

__all__ = [
    "DiskBudget",
    "Executor",
    "Group",
    "InProcessExecutor",
    "RenderCache",
    "RenderKey",
    "ResultKey",
    "Settings",
    "plan",
    "render_cached",
]
