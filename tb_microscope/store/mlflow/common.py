"""What the MLflow modules share: `runs:/` URIs, importing mlflow (only when an MLflow run is
used), the tracking URI, the local folders a run is mirrored and staged in, the tag that marks our
runs, and the errors a tracking server's failures become."""

from __future__ import annotations

import contextlib
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
    """The tracking server (or its artifact store) could not be reached, refused a request, or
    failed at it."""


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


NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"}  # MLflow's error codes for what is missing
DENIED = {"UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"}


def _http_status(e: BaseException) -> int | None:
    """The HTTP status a server answered with, where `e` says: a requests HTTPError's response,
    or MLflow's text for an answer that was not JSON (`failed with error code 401 != 200`) or that
    its retries gave up on (`too many 503 error responses`)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(status, int):
        return status
    found = re.search(r"failed with error code (\d{3})|too many (\d{3}) error responses", str(e))
    return int(found.group(1) or found.group(2)) if found else None


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and every error it was raised from or while handling, and urllib3's `reason`s."""
    found: list[BaseException] = []
    todo: list[BaseException] = [e]
    while todo:
        error = todo.pop()
        if any(error is seen for seen in found):
            continue
        found.append(error)
        todo += [
            cause
            for cause in (error.__cause__, error.__context__, getattr(error, "reason", None))
            if isinstance(cause, BaseException)
        ]
    return found


def _network_failure(e: BaseException) -> str | None:
    """How `e` failed to get an answer of the server, if it did: "timeout" (connected, and no
    answer in time; MLflow's client reports it as a connection error caused by a read timeout)
    or "unreachable" (no connection: refused, or not made in time); else None."""
    timeouts: tuple[type, ...] = (TimeoutError,)
    unreachable: tuple[type, ...] = (ConnectionError,)
    # mlflow's HTTP client; not urllib3's TimeoutError, of which its refused connections are one
    with contextlib.suppress(ImportError):
        from requests import exceptions as http
        from urllib3 import exceptions as connection

        timeouts = (http.ReadTimeout, connection.ReadTimeoutError)
        unreachable = (ConnectionError, http.ConnectionError)
    causes = _causes(e)
    if any(isinstance(cause, timeouts) for cause in causes):
        return "timeout"
    if any(isinstance(cause, unreachable) for cause in causes):
        return "unreachable"
    text = str(e)  # MLflow's own words, where it kept no cause
    if "failed with timeout exception" in text:
        return "timeout"
    if "failed with exception" in text and _http_status(e) is None:
        return "unreachable"
    return None


def mlflow_error(e: Exception, what: str, uri: str) -> MicroscopeError:
    """The error to raise for `e`, raised by MLflow while reading `what` from the server `uri`:
    what is missing (a RunNotFoundError), and what the server refused for want of credentials,
    could not be reached for, took too long over, or failed at (with the server's message),
    each saying what to do (a MlflowUnavailableError)."""
    code = getattr(e, "error_code", "") or ""
    status = _http_status(e)
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    at = f"the MLflow tracking server {uri}"
    if code in NOT_FOUND or (status == 404 and code != "ENDPOINT_NOT_FOUND"):
        return RunNotFoundError(f"{what} does not exist at {at}")
    if code in DENIED or status in (401, 403):
        return MlflowUnavailableError(
            f"{at} refused {what} ({text}): check the credentials this process gives it, "
            "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            "and that they may read it"
        )
    if code == "ENDPOINT_NOT_FOUND":
        return MlflowUnavailableError(
            f"{at} has no such endpoint for {what} ({text}); check that MLFLOW_TRACKING_URI "
            "(or the URI you gave) points at an MLflow tracking server"
        )
    failure = _network_failure(e)
    # no answer, or a failure inside the server: an outage (runs already mirrored stay shown)
    if failure == "timeout":
        return MlflowUnreachableError(
            f"{at} did not answer in time for {what} ({text}); check that the server is running "
            "and not overloaded (MLFLOW_HTTP_REQUEST_TIMEOUT sets how long to wait)"
        )
    if failure == "unreachable":
        return MlflowUnreachableError(
            f"could not read {what} from {at} ({text}); check that the server is running and "
            "MLFLOW_TRACKING_URI (or the URI you gave) points at it"
        )
    if code == "INTERNAL_ERROR" or (status is not None and status >= 500):
        return MlflowUnreachableError(f"{at} failed to give {what}: {text}")
    answered = type(e).__name__ == "RestException"  # the server's own error, as JSON
    if answered or status is not None or code:
        return MlflowUnavailableError(f"{at} failed to give {what}: {text}")
    return MlflowUnreachableError(f"reading {what} from {at} failed ({text})")
