"""The analyses' warm-up (`analysis/warmup.py`): started once however many threads ask, and a
UMAP layout after it compiles nothing (numba's compilations are watched through its events)."""

import threading

import numpy as np
from numba.core import event

from tb_microscope.analysis import embedding
from tb_microscope.analysis.warmup import DONE, SKIPPED, WarmUp


class Compilations(event.Listener):
    """The names of the functions numba compiles while it listens (the outermost of each)."""

    def __init__(self):
        self.names: list[str] = []
        self._depth = 0

    def on_start(self, ev):
        self._depth += 1

    def on_end(self, ev):
        self._depth -= 1
        if self._depth == 0:
            self.names.append(ev.data["dispatcher"].py_func.__qualname__)


def test_the_warm_up_starts_once_however_many_threads_ask():
    warm_up, threads = WarmUp(), 8
    barrier, started = threading.Barrier(threads), []

    def start():
        barrier.wait()
        started.append(warm_up.start())

    askers = [threading.Thread(target=start) for _ in range(threads)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert sorted(started) == [False] * (threads - 1) + [True]
    assert warm_up.done.wait(600), "the warm-up did not finish"
    state = warm_up.state()
    assert state["status"] == DONE and state["seconds"] > 0
    assert set(state["parts"]) == {"umap", "nmf", "sae"}
    assert isinstance(state["parts"]["umap"], float)  # umap-learn is installed (skipped above)
    for part in ("nmf", "sae"):
        assert isinstance(state["parts"][part], float) or state["parts"][part] == SKIPPED
    assert not warm_up.start() and warm_up.state()["status"] == DONE  # never a second time


def test_a_umap_layout_after_the_warm_up_compiles_nothing():
    assert embedding.warm_up_umap()
    compiled = Compilations()
    event.register("numba:compile", compiled)
    try:
        rng = np.random.default_rng(3)
        # both of umap-learn's roads to the neighbours, activations of any float type and width
        for rows, width, dtype in (
            (40, 24, np.float64),
            (embedding.UMAP_APPROXIMATE, 12, np.float32),
        ):
            layout, method = embedding.embed(rng.random((rows, width)).astype(dtype), "umap", 5)
            assert method == "umap" and layout.shape == (rows, 2)
    finally:
        event.unregister("numba:compile", compiled)
    assert compiled.names == []
