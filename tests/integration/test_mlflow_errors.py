"""What an MLflow failure says, through MLflow's own client: a server (here a local stand-in, as
an authenticating proxy or a failing server answers) that refuses for want of credentials, that
refuses a request with its reason, that fails, or that does not answer in time. A run that does
not exist and a server that is not running are in test_mlflow.py, against a real server."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tb_microscope
from tb_microscope.store.mlflow import MlflowUnavailableError

RUN = "0123456789abcdef0123456789abcdef"


class Answers:
    """An HTTP server on 127.0.0.1 answering every request with `status` and `body`, after
    `delay` seconds."""

    def __init__(self, status: int, body: str, delay: float = 0.0):
        answers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                time.sleep(answers.delay)
                data = answers.body.encode()
                self.send_response(answers.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.status, self.body, self.delay = status, body, delay
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def answering(tmp_path, monkeypatch):
    """Start servers that answer as told; MLflow's client asks once and waits 2 s at most."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    started = []

    def start(status: int, body: str, delay: float = 0.0) -> str:
        started.append(Answers(status, body, delay))
        return started[-1].url

    yield start
    for server in started:
        server.close()


def opening_says(uri: str) -> str:
    with pytest.raises(MlflowUnavailableError) as raised:
        tb_microscope.open_run(f"runs:/{RUN}", tracking_uri=uri)
    return str(raised.value)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusal_for_want_of_credentials_names_them(answering, status):
    uri = answering(status, "<html>Unauthorized</html>")  # a proxy's page, not MLflow's JSON
    said = opening_says(uri)
    assert said.startswith(f"the MLflow tracking server {uri} refused MLflow run {RUN}")
    assert f"error code {status}" in said
    assert "MLFLOW_TRACKING_TOKEN" in said and "MLFLOW_TRACKING_PASSWORD" in said
    assert "is running" not in said


def test_a_refused_request_gives_the_servers_reason(answering):
    reason = {"error_code": "INVALID_PARAMETER_VALUE", "message": f"Run '{RUN}' is malformed"}
    uri = answering(400, json.dumps(reason))
    said = opening_says(uri)
    assert said == (
        f"the MLflow tracking server {uri} failed to give MLflow run {RUN}: "
        f"INVALID_PARAMETER_VALUE: Run '{RUN}' is malformed"
    )


def test_a_failing_server_is_not_said_to_be_down(answering):
    uri = answering(500, json.dumps({"error_code": "INTERNAL_ERROR", "message": "disk I/O error"}))
    said = opening_says(uri)
    assert said.startswith(f"the MLflow tracking server {uri} failed to give MLflow run {RUN}")
    assert "is running" not in said


def test_a_server_that_does_not_answer_in_time_says_how_long_to_wait(answering):
    uri = answering(200, "{}", delay=5)
    said = opening_says(uri)
    assert said.startswith(f"the MLflow tracking server {uri} did not answer in time")
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" in said
