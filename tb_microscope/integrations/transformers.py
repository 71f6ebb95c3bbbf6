"""`MicroscopeCallback`: the Logger as a Hugging Face `Trainer` callback (extra
`tb-microscope[transformers]`).

    trainer = Trainer(model, args, train_dataset=data, callbacks=[MicroscopeCallback()])

The run goes where the Trainer's own logs go: into the Trainer's MLflow run when `report_to`
includes "mlflow", else into a TensorBoard run directory beside the Trainer's scalars (see
`default_logdir`). Steps are `state.global_step`, the number of optimizer steps taken. The example
input defaults to the first items of the training set, collated by the Trainer's own dataloader
(see `first_batch`), and is given to the model as its first argument: a Hugging Face vision
model's `pixel_values`.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import random
import socket
import warnings
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..store.mlflow import import_mlflow
from ..training.capture import unwrap
from ..training.logger import Logger

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError(
        "MicroscopeCallback needs transformers: pip install 'tb-microscope[transformers]'"
    ) from e

__all__ = ["MicroscopeCallback", "default_logdir", "first_batch", "model_input"]

log = logging.getLogger(__name__)

# How many items of the training set make the example batch when none is given.
EXAMPLE_ITEMS = 8


class MicroscopeCallback(TrainerCallback):
    """Snapshot the Trainer's model on the Logger's schedule during `train()`.

    `logdir` defaults to the Trainer's MLflow run or a run directory beside its TensorBoard
    scalars (`default_logdir`). `example_input` (a tensor, or a batch as the Trainer feeds it:
    a dict such as `{"pixel_values": x}`) defaults to the first items of the training set,
    collated as the Trainer collates them (`first_batch`). Every other keyword goes to
    `tb_microscope.Logger` (every, steps, nodes, probe, normalize, value_range, strict, ...).
    Only the main process logs; `logger` is its Logger once training has begun.
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        example_input: torch.Tensor | Mapping[str, Any] | None = None,
        **logger_options: Any,
    ):
        super().__init__()
        self.logdir = logdir
        self.example_input = example_input
        self.logger_options = logger_options
        self.logger: Logger | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.example_input is None and train_dataloader is None:  # on every process alike
            raise ValueError(
                "MicroscopeCallback needs an example batch: pass example_input= (a batch as the "
                "model takes it, e.g. {'pixel_values': images[:8]}), or give the Trainer a "
                "train_dataset to take one from"
            )
        if not state.is_world_process_zero:  # as the Trainer's own loggers: the main process only
            return
        if self.logger is not None:  # an earlier train() of the same Trainer
            self.logger.close(raise_errors=False)
        model = unwrap(model)
        batch = self.example_input
        if batch is None:
            batch = first_batch(train_dataloader)
        example = model_input(model, batch, getattr(args, "label_names", None))
        logdir, options = self._target(args)
        self.logger = Logger(logdir, model, example, **options)
        where = (
            f"MLflow run {self.logger.mlflow_run_id}"
            if self.logger.mlflow_run_id
            else str(self.logger.store.run_dir)
        )
        log.info("tb_microscope: snapshots of %s go to %s", type(model).__name__, where)
        self.logger.log(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.log(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.logger is not None:
            self.logger.close()

    def _target(self, args) -> tuple[str | Path, dict[str, Any]]:
        """Where the run goes, and the Logger's options for it."""
        options = dict(self.logger_options)
        if self.logdir is not None:
            return self.logdir, options
        if "mlflow" in (args.report_to or []):
            mlflow = import_mlflow()
            run = mlflow.active_run()  # started by the Trainer's MLflowCallback, called before us
            if run is None:
                raise ValueError(
                    "report_to includes 'mlflow' but no MLflow run is active when training "
                    "begins (is DISABLE_MLFLOW_INTEGRATION set?): start one with "
                    "mlflow.start_run(), or pass MicroscopeCallback(logdir=...)"
                )
            options.setdefault("run_id", run.info.run_id)
            options.setdefault("tracking_uri", mlflow.get_tracking_uri())
            return "mlflow", options
        return default_logdir(args), options


def default_logdir(args) -> str:
    """The run directory beside the Trainer's TensorBoard scalars.

    transformers 4.x names it `args.logging_dir`. In 5.x that argument is gone and the Trainer's
    `TensorBoardCallback` writes to $TENSORBOARD_LOGGING_DIR, else to a directory it names when
    training begins, `<output_dir>/runs/<time>_<host>`: with "tensorboard" in `report_to` that is
    the directory under `<output_dir>/runs` holding this process's newest event file (that
    callback runs before this one); otherwise a new directory named the same way.
    """
    named = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if named:
        return os.path.expanduser(named)
    runs = Path(args.output_dir or "trainer_output", "runs")
    if "tensorboard" in (args.report_to or []) and runs.is_dir():
        pid = str(os.getpid())
        ours = [
            p
            for p in runs.rglob("events.out.tfevents.*")
            if p.name.rsplit(".", 2)[-2] == pid and not p.name.endswith(".tb_microscope")
        ]
        if ours:
            return str(max(ours, key=lambda p: p.stat().st_mtime_ns).parent)
    stamp = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
    return str(runs / f"{stamp}_{socket.gethostname()}")


def first_batch(dataloader, items: int = EXAMPLE_ITEMS) -> Any:
    """The first `items` items of `dataloader`'s dataset, collated by its `collate_fn`: a batch
    as the Trainer feeds it, read without iterating the dataloader itself, so that no sampler or
    worker is started and no random number the training draws is used (the random states of
    torch's CPU generator, `random` and numpy are put back, for datasets that augment at random)."""
    dataset = dataloader.dataset
    torch_state, py_state, np_state = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
    )
    try:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            found = list(islice(iter(dataset), items))
        else:
            found = [dataset[i] for i in range(min(items, len(dataset)))]
        if not found:
            raise ValueError(
                "MicroscopeCallback found no items in the training set to take an example batch "
                "from: pass example_input="
            )
        return dataloader.collate_fn(found)
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def model_input(model: nn.Module, batch: Any, label_names: list[str] | None = None) -> torch.Tensor:
    """The tensor of `batch` that the Logger gives `model` as `model(x)`.

    The Trainer calls `model(**batch)`; the Logger captures a model as a function of one input,
    its first argument, which is what the Microscope's pictures optimize. So a dict batch gives
    the value of the forward's first parameter (`pixel_values` for Hugging Face vision models);
    its other inputs, labels aside, keep their defaults, with a warning.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"MicroscopeCallback cannot read an example input from a batch of type "
            f"{type(batch).__name__}: pass example_input= (a tensor the model takes as model(x))"
        )
    parameters = list(inspect.signature(model.forward).parameters.values())
    first = parameters[0].name if parameters else None
    value = batch.get(first)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"the batch holds {sorted(batch)}, not {type(model).__name__}.forward's first "
            f"argument {first!r}: tb_microscope captures a model as a function of its first "
            "argument (the images: pixel_values for Hugging Face vision models). Pass "
            "example_input= a tensor the model takes as model(x)"
        )
    labels = set(label_names or ()) | {"labels", "label", "label_ids"}
    unused = sorted(k for k, v in batch.items() if k != first and k not in labels and v is not None)
    if unused:
        warnings.warn(
            f"tb_microscope: {type(model).__name__} is captured as a function of {first!r} "
            f"alone; the batch's {', '.join(unused)} keep their defaults in the pictures",
            RuntimeWarning,
            stacklevel=2,
        )
    return value
