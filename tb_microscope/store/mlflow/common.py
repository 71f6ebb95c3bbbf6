"""What the MLflow modules share: `runs:/` URIs, importing mlflow (only when an MLflow run is
used), the tracking URI, the local folders a run is mirrored and staged in, the tag that marks our
runs, and the errors a tracking server's failures become."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ...errors import MicroscopeError, RunNotFoundError
from ..paths import user_cache_root

ARTIFACTS = "tb_microscope"  # the folder of a run's artifacts our files go to
TAG = "tb_microscope.run"  # on an MLflow run that holds our data; its value is our run id
MLFLOW_URI = re.compile(r"^runs:/([A-Za-z0-9_-]{1,64})/?$")


class MlflowUnavailableError(MicroscopeError):
    """The tracking server (or its artifact store) could not be reached or refused a request."""


class MlflowUnreachableError(MlflowUnavailableError):
    """The tracking server (or its artifact store) gave no answer: not there, down, or hanging past
    the request timeout (or it failed inside)."""


def parse_mlflow_uri(text: str) -> str:
    """The MLflow run id in `runs:/<run_id>`."""
    m = MLFLOW_URI.match(text)
    if not m:
        raise RunNotFoundError(
            f"{text!r} is not an MLflow run URI; write runs:/<run_id>, the id MLflow shows "
            "on the run's page"
        )
    return m.group(1)


def import_mlflow():
    """mlflow, or an error saying how to install it."""
    try:
        import mlflow
    except ImportError as e:
        raise MicroscopeError(
            "MLflow runs need the mlflow package: pip install 'tb-microscope[mlflow]'"
        ) from e
    # Its download progress bars would interleave with ours (and fill TensorBoard's log).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return mlflow


def tracking_uri(uri: str | None = None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI (what mlflow itself would use)."""
    return uri or import_mlflow().get_tracking_uri()


def _place(uri: str) -> str:
    """A short name for a tracking server, for folders that must not mix two servers' runs."""
    return hashlib.sha256(uri.encode()).hexdigest()[:12]


def mirror_dir(uri: str, mlflow_run_id: str) -> Path:
    return user_cache_root() / "mlflow" / _place(uri) / mlflow_run_id


def staging_dir(uri: str, mlflow_run_id: str) -> Path:
    return user_cache_root() / "mlflow-upload" / _place(uri) / mlflow_run_id


def active_run_id(run_id: str | None) -> str:
    """`run_id`, else the active MLflow run's, else an error saying what to do."""
    if run_id:
        return run_id
    mlflow = import_mlflow()
    run = mlflow.active_run()
    if run is None:
        raise MicroscopeError(
            "Logger('mlflow', ...) logs into the active MLflow run, and there is none: call "
            "mlflow.start_run() first (or use `with mlflow.start_run():`), or pass run_id="
        )
    return run.info.run_id


def mlflow_error(e: Exception, what: str, uri: str) -> MicroscopeError:
    """The error to raise for `e`, raised by MLflow while reading `what` from the server `uri`."""
    code = getattr(e, "error_code", "")
    if code == "RESOURCE_DOES_NOT_EXIST":
        return RunNotFoundError(f"{what} does not exist at the MLflow tracking server {uri}")
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if code and code != "INTERNAL_ERROR" and "failed with exception" not in text:
        # the server answered, and refused
        return MlflowUnavailableError(f"the MLflow tracking server {uri} refused {what}: {text}")
    return MlflowUnreachableError(
        f"could not read {what} from the MLflow tracking server {uri} ({text}); check that the "
        "server is running and MLFLOW_TRACKING_URI (or the URI you gave) points at it"
    )
