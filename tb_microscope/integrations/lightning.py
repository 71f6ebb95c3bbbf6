"""`MicroscopeCallback`: the Logger as a Lightning callback (extra `tb-microscope[lightning]`).

    trainer = L.Trainer(callbacks=[MicroscopeCallback(example_input=x[:8])])

The run directory defaults to the trainer's logger directory (`trainer.log_dir`), so the
Microscope tab shows up next to Lightning's own TensorBoard scalars; when the trainer logs to
MLflow (Lightning's `MLFlowLogger`), the snapshots go into that logger's MLflow run instead.
Steps are `trainer.global_step`, the number of optimizer steps taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..training.logger import Logger

try:
    from lightning.pytorch import Callback
except ImportError:  # the older standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError(
            "MicroscopeCallback needs Lightning: pip install 'tb-microscope[lightning]'"
        ) from e


class MicroscopeCallback(Callback):
    """Snapshot the LightningModule's weights on the Logger's schedule during `fit`.

    `example_input` defaults to the module's `example_input_array`. Every other keyword goes to
    `tb_microscope.Logger` (every, steps, nodes, probe, normalize, value_range, strict).
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        example_input: torch.Tensor | None = None,
        **logger_options: Any,
    ):
        super().__init__()
        self.logdir = logdir
        self.example_input = example_input
        self.logger_options = logger_options
        self.logger: Logger | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        if not isinstance(example, torch.Tensor):
            raise ValueError(
                "MicroscopeCallback needs an example batch: pass example_input= or set the "
                "LightningModule's example_input_array"
            )
        options = dict(self.logger_options)
        logdir = self.logdir
        if logdir is None:
            mlflow_logger = next(
                (lg for lg in trainer.loggers if type(lg).__name__ == "MLFlowLogger"), None
            )
            if mlflow_logger is not None:  # into the trainer's MLflow run
                logdir = "mlflow"
                options.setdefault("run_id", mlflow_logger.run_id)
                options.setdefault("tracking_uri", getattr(mlflow_logger, "_tracking_uri", None))
            else:
                logdir = trainer.log_dir or trainer.default_root_dir
        self.logger = Logger(logdir, pl_module, example, **options)
        self.logger.log(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.logger is not None:
            self.logger.log(trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.logger is not None:
            self.logger.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.logger is not None:
            self.logger.close(raise_errors=False)
