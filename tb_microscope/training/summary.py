"""One small tensor summary per snapshot in the run's event file.

TensorBoard lists a run, and asks plugins whether they are active, from its event files; the
snapshots themselves are read directly from the run store. Each summary holds the step's snapshot
size in bytes and names this plugin, with `data_class` set so the data server keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from ..store.manifest import FORMAT_VERSION, SUMMARY_TAG
from ..store.paths import PLUGIN_NAME


def snapshot_summary(snapshot_bytes: int) -> summary_pb2.Summary:
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME,
            content=json.dumps({"version": FORMAT_VERSION}).encode(),
        ),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    value = summary_pb2.Summary.Value(
        tag=SUMMARY_TAG,
        metadata=metadata,
        tensor=tensor_util.make_tensor_proto(np.asarray(snapshot_bytes, dtype=np.int64)),
    )
    return summary_pb2.Summary(value=[value])


class SnapshotEvents:
    """Appends snapshot summaries to an event file of its own in the run directory."""

    def __init__(self, run_dir: Path):
        self._run_dir = run_dir
        self._writer: EventFileWriter | None = None

    def write(self, step: int, snapshot_bytes: int, wall_time: float) -> None:
        if self._writer is None:
            self._writer = EventFileWriter(str(self._run_dir), filename_suffix=".tb_microscope")
        event = event_pb2.Event(
            wall_time=wall_time, step=step, summary=snapshot_summary(snapshot_bytes)
        )
        self._writer.add_event(event)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
