"""One road for errors, without a server: what a route answers for each kind of error, a warning
that is also a log record with its traceback, and what an MLflow failure becomes."""

import errno
import logging
import warnings

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException, get_error_code
from tensorboard import errors

from tb_microscope.errors import (
    CorruptSnapshotError,
    MicroscopeError,
    NodeNotFoundError,
    RunNotFoundError,
    StepNotFoundError,
    warn,
)
from tb_microscope.limits import SettingError
from tb_microscope.optvis.param import display_bands
from tb_microscope.optvis.techniques import get_technique
from tb_microscope.server.requests import InternalError, UnavailableError, public_errors
from tb_microscope.store.mlflow.common import MlflowUnavailableError, mlflow_error

# --- what a route answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [NodeNotFoundError("no node 'x'"), StepNotFoundError("no step 9"), RunNotFoundError("no run")],
)
def test_what_is_missing_is_a_404(error):
    with pytest.raises(errors.NotFoundError, match=str(error)):
        with public_errors():
            raise error


def test_a_users_mistake_is_a_400_saying_what_to_do():
    with pytest.raises(errors.InvalidArgumentError, match="CorruptSnapshotError: torn file"):
        with public_errors():
            raise CorruptSnapshotError("torn file")
    with pytest.raises(errors.InvalidArgumentError, match="size must be"):
        with public_errors():
            raise SettingError("size must be from 8 to 1024")  # a ValueError too
    with pytest.raises(errors.InvalidArgumentError, match="techniques: channel"):
        with public_errors():
            get_technique("wobble")
    with pytest.raises(errors.InvalidArgumentError, match="three channel indexes from 0 to 3"):
        with public_errors():
            display_bands(4, [0, 1])
    with pytest.raises(errors.InvalidArgumentError, match="pass source="):
        with public_errors():
            raise MicroscopeError("node 'conv1' reads the input directly; pass source=")


def test_tensorboards_own_errors_pass_as_they_are():
    for error in (errors.InvalidArgumentError("bad"), UnavailableError("queue full")):
        with pytest.raises(type(error)) as raised:
            with public_errors():
                raise error
        assert raised.value is error


@pytest.mark.parametrize(
    "error",
    [
        ValueError("could not convert"),
        KeyError("conv9"),
        OSError(errno.EIO, "Input/output error"),
        PermissionError(errno.EACCES, "Permission denied"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_or_a_fault_is_a_500_with_its_traceback_in_the_log(error, caplog):
    with pytest.raises(InternalError) as raised, caplog.at_level(logging.ERROR, "tb_microscope"):
        with public_errors():
            raise error
    assert raised.value.http_code == 500 and raised.value.__cause__ is error
    message = str(raised.value)
    assert message.startswith(f"internal error in tb_microscope ({type(error).__name__}")
    assert message.endswith("the server's log has the traceback")
    (record,) = caplog.records
    assert record.name == "tb_microscope.server.requests" and record.levelno == logging.ERROR
    assert record.exc_info[1] is error
    assert "Traceback (most recent call last)" in caplog.text


# --- a warning that is also a log record ----------------------------------------------------------


def test_a_warning_is_also_a_log_record_with_the_errors_traceback(caplog):
    log = logging.getLogger("tb_microscope.training.writer")
    try:
        open("/nonexistent/dir/file", "rb")
    except OSError as e:
        error = e
    with warnings.catch_warnings(record=True) as said, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        warn("writing step 3 failed", error, log)
    assert [str(w.message) for w in said] == ["tb_microscope: writing step 3 failed"]
    (record,) = caplog.records
    assert record.name == "tb_microscope.training.writer" and record.levelno == logging.WARNING
    assert record.getMessage() == "tb_microscope: writing step 3 failed"
    assert record.exc_info[1] is error and "test_errors.py" in caplog.text  # where it was raised
    with warnings.catch_warnings(record=True) as said, caplog.at_level(logging.WARNING):
        warnings.simplefilter("ignore")  # a script that filters warnings
        warn("the capture process is stuck")
    assert not said and caplog.records[-1].name == "tb_microscope"
    assert caplog.records[-1].exc_info is None  # nothing raised, no traceback


# --- what an MLflow failure becomes --------------------------------------------------------------

URI = "http://mlflow.example:5000"


def raised_by_mlflow(cause: Exception) -> MlflowException:
    """What MLflow's HTTP client raises for `cause`: its own error, raised while handling it."""
    try:
        try:
            raise cause
        except requests.exceptions.Timeout as e:
            raise MlflowException(f"API request to {URI} failed with timeout exception {e}") from e
        except Exception as e:
            raise MlflowException(f"API request to {URI} failed with exception {e}")  # noqa: B904
    except MlflowException as e:
        return e


def not_json(status: int) -> MlflowException:
    """MLflow's error for an answer that is not JSON (a proxy's, say)."""
    return MlflowException(
        f"API request to endpoint /api/2.0/mlflow/runs/get failed with error code {status} != "
        "200. Response body: 'go away'",
        error_code=get_error_code(status),
    )


def http_error(status: int) -> requests.HTTPError:
    """What MLflow's artifact client raises for an artifact the server will not give."""
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    "error",
    [
        RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run 'abc' not found"}),
        http_error(404),
    ],
    ids=["rest", "artifact"],
)
def test_what_mlflow_does_not_have_is_not_found(error):
    said = mlflow_error(error, "MLflow run abc", URI)
    assert isinstance(said, RunNotFoundError)
    assert str(said) == f"MLflow run abc does not exist at the MLflow tracking server {URI}"


@pytest.mark.parametrize(
    "error",
    [
        not_json(401),
        not_json(403),
        RestException({"error_code": "PERMISSION_DENIED", "message": "no READ on experiment 1"}),
        RestException({"error_code": "UNAUTHENTICATED", "message": "token expired"}),
        http_error(403),
    ],
    ids=["401", "403", "denied", "unauthenticated", "artifact-403"],
)
def test_a_refusal_for_want_of_credentials_names_them(error):
    said = mlflow_error(error, "MLflow run abc", URI)
    assert isinstance(said, MlflowUnavailableError)
    assert f"the MLflow tracking server {URI} refused MLflow run abc" in str(said)
    assert "MLFLOW_TRACKING_TOKEN" in str(said) and "MLFLOW_TRACKING_USERNAME" in str(said)
    assert "is running" not in str(said)


def test_a_server_that_cannot_be_reached_or_does_not_answer_in_time_says_so():
    refused = raised_by_mlflow(requests.exceptions.ConnectionError("Connection refused"))
    said = str(mlflow_error(refused, "MLflow run abc", URI))
    assert said.startswith(f"could not read MLflow run abc from the MLflow tracking server {URI}")
    assert "check that the server is running" in said and "Connection refused" in said
    slow = raised_by_mlflow(requests.exceptions.ReadTimeout("Read timed out"))
    said = str(mlflow_error(slow, "MLflow run abc", URI))
    assert "did not answer in time for MLflow run abc" in said
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" in said


def test_another_failure_of_the_server_gives_its_message():
    error = RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"})
    said = mlflow_error(error, "MLflow run abc", URI)
    assert str(said) == (
        f"the MLflow tracking server {URI} failed to give MLflow run abc: "
        "INTERNAL_ERROR: database is locked"
    )
    gave_up = raised_by_mlflow(
        requests.exceptions.RetryError("Max retries exceeded (too many 503 error responses)")
    )
    said = str(mlflow_error(gave_up, "MLflow run abc", URI))
    assert "failed to give MLflow run abc" in said and "is running" not in said
    said = str(mlflow_error(not_json(404), "MLflow run abc", URI))  # not an MLflow server
    assert "has no such endpoint" in said and "points at an MLflow tracking server" in said
