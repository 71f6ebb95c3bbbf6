import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPTS = Path(__file__).parent / "scripts"
CHROMIUM = "/usr/bin/chromium"  # Debian's; scripts/browser.sh installs it
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(
    os.environ.get("TB_MICROSCOPE_SCREENSHOTS")
    or Path(__file__).resolve().parent.parent / "build" / "screenshots"
)


def run_python(*args, cwd=None, timeout=600, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run a Python process of the test environment; fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextlib.contextmanager
def tensorboard(
    logdir,
    *flags: str,
    env: dict | None = None,
    output: list | None = None,
    warm_up: bool = False,
):
    """A real `tensorboard` process on 127.0.0.1 and a free port; yields its base URL. Its output
    (stdout and stderr) is appended to `output` line by line as it comes, when given. Without
    `warm_up`, the server does not warm up the analyses' libraries (half a minute of numba
    compiling, which would slow every other test on a 2-core machine; test_plugin.py tests it)."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    command += ["--host", "127.0.0.1", "--port", "0", "--reload_interval", "1"]
    command += ["--microscope_device", "cpu", *flags]
    if not warm_up and "--microscope_no_warm_up" not in flags:
        command.append("--microscope_no_warm_up")
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        url, seen = None, ([] if output is None else output)
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+(/[^/\s]+)?)/", line)
            url = match.group(1) if match else None
        assert url, "tensorboard did not start:\n" + "".join(seen)
        # read on: a full pipe would block the server's next log line
        threading.Thread(target=_read_lines, args=(proc.stdout, seen), daemon=True).start()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _read_lines(stream, lines: list) -> None:
    for line in stream:
        lines.append(line)


def http(url: str, body=None, headers=None) -> tuple[int, str, bytes]:
    """GET `url`, or POST `body` (bytes, or JSON for anything else) with `headers`; returns the
    status, content type and body, errors included."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.drop(x.mean((2, 3))))


class FixedSizeFaceNet(nn.Module):
    """A 48 px face detector's shape: conv, PReLU, ceil-mode max-pool three times, then a linear
    head after a permute (it takes no other input size)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 8, 3), nn.PReLU(8)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(8, 16, 3), nn.PReLU(16)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(16, 16, 3), nn.PReLU(16)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(16, 32, 2), nn.PReLU(32)
        self.dense5, self.prelu5 = nn.Linear(32 * 9, 64), nn.PReLU(64)
        self.face, self.box = nn.Linear(64, 2), nn.Linear(64, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x)).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.face(x), self.box(x)


class Attention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.softmax, self.attn_drop = nn.Softmax(-1), nn.Dropout(0.1)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attn_drop(self.softmax(q @ k.transpose(-1, -2)))
        return self.proj((a @ v).transpose(1, 2).reshape(n, t, d))


class FixedSizeViT(nn.Module):
    """Sixteen patch tokens and no class token: its attention map, heads x 16 x 16, has the shape
    of a 16 x 16 feature map of its 32 px input; position embeddings fix the input size."""

    def __init__(self, prefix=0):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, prefix, 16))
        self.pos = nn.Parameter(torch.randn(1, 16 + prefix, 16))
        self.pos_drop, self.attn, self.norm = nn.Dropout(0.1), Attention(), nn.Identity()
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = self.pos_drop(torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos)
        return self.head(self.norm(self.attn(t)).mean(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def example():
    return torch.rand(4, 3, 16, 16)


def train_step(model, x, lr=0.1):
    """One SGD step that changes every weight, so consecutive snapshots differ."""
    model.train()
    loss = model(x).square().mean()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def unwritable(path, locked: bool = True) -> None:
    """Make a directory unwritable (or writable again), even for root (who ignores permission
    bits)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if locked else "-i", str(path)], check=True)
    else:
        path.chmod(0o555 if locked else 0o755)


@pytest.fixture
def read_only():
    """Make a directory unwritable, even for root, until the test ends."""
    made = []

    def lock(path):
        unwritable(path)
        made.append(path)

    yield lock
    for path in made:
        unwritable(path, locked=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend store, artifacts served from a
    temporary folder); `stop()` kills it at once, `start()` brings it back on the same port and
    stores."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        command += ["--workers", "1"]
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        log = (self.root / "server.log").read_text()
        raise AssertionError(f"mlflow server did not start:\n{log[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


class Cuttable:
    """A TCP forwarder from a free port on 127.0.0.1 to `port`: a server seen through it goes
    away and comes back at once. `cut()` closes the port and every connection through it (what
    clients see of a server that died: their connections drop, new ones are refused);
    `restore()` opens the same port again."""

    def __init__(self, port: int):
        self.target, self.port = port, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            doomed, self._sockets = self._sockets | {listener}, set()
        for sock in doomed:
            _drop(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                if self._listener is not listener:
                    return  # cut
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _drop(client)  # the server itself is not there: neither is the forwarder
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _drop(client)
                    _drop(upstream)
                    return
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._sockets -= {source, sink}
        _drop(source)
        _drop(sink)


def _drop(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
    sock.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def lightning_module():
    """A small LightningModule (a conv, a ReLU, a linear head) with its example_input_array."""
    import lightning.pytorch as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
            self.example_input_array = torch.rand(2, 3, 8, 8)
            self.net(self.example_input_array)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


class StoreServer:
    """A real object store's server process on 127.0.0.1 and a free port, in a session of its
    own (so that signals reach all of it), logging to `root`/`log`. Subclasses say how it is
    started (`command`) and where it answers once it is up (`ready`)."""

    log = "server.log"
    ready = "/"

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.root / self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / self.log).read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.url + self.ready, timeout=5):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"{type(self).__name__} did not start: {self.log_text()}")

    def log_text(self) -> str:
        return (self.root / self.log).read_text()[-3000:]

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


class S3Server(StoreServer):
    """A real S3-compatible server (`moto_server`) on 127.0.0.1 and a free port; `env` is the
    environment a client needs (credentials, region, the endpoint for boto3 / s3fs and for
    TensorBoard's S3_ENDPOINT). `pause()` / `resume()` stop and continue it (SIGSTOP / SIGCONT):
    what a client sees of a store that hangs."""

    log, ready = "moto.log", "/moto-api/"

    def __init__(self, root: Path):
        super().__init__(root)
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.url,
            "S3_ENDPOINT": self.url,
        }

    def command(self) -> list[str]:
        moto = Path(sys.executable).parent / "moto_server"
        return [str(moto), "-H", "127.0.0.1", "-p", str(self.port)]

    def bucket(self, name: str) -> str:
        """Create the bucket `name`; returns its URL, s3://name."""
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server for the module; the test process's environment points at it while the
    module runs (s3fs, boto3 and TensorBoard read it from there)."""
    with serving(S3Server(tmp_path_factory.mktemp("s3"))) as server:
        yield server


@contextlib.contextmanager
def serving(server: StoreServer):
    """`server` started, and the test process's environment pointing at it (its `env`), until
    the block ends: then the environment is as it was and the server stopped."""
    server.start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


class GcsServer(StoreServer):
    """A real GCS-compatible server (`gcp-storage-emulator`, pure Python, its JSON API) on
    127.0.0.1 and a free port; `env` is what a client needs: gcsfs reads the endpoint from
    STORAGE_EMULATOR_HOST and fsspec gives it the anonymous token from FSSPEC_GS_TOKEN.

    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs (2026.x) otherwise asks Google's gRPC Storage
    Control API for each bucket's layout, which an emulator does not serve; every such call waits
    out its timeout (30 s, retried) before gcsfs falls back to the JSON API."""

    log, ready = "gcs.log", "/storage/v1/b"

    def __init__(self, root: Path):
        super().__init__(root)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GS_TOKEN": "anon",
            "FSSPEC_GS_PROJECT": "test",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def command(self) -> list[str]:
        emulator = Path(sys.executable).parent / "gcp-storage-emulator"
        data = str(self.root / "data")
        return [str(emulator), "-d", data, "start", "-H", "127.0.0.1", "--port", str(self.port)]

    def bucket(self, name: str) -> str:
        """Create the bucket `name` (through the JSON API); returns its URL, gs://name."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30):
            return f"gs://{name}"


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """A GCS emulator for the module; the test process's environment and fsspec's configuration
    point gcsfs at it while the module runs (the classic GCSFileSystem: see `GcsServer`)."""
    import fsspec

    protocols = ("gs", "gcs")
    with serving(GcsServer(tmp_path_factory.mktemp("gcs"))) as server:
        import gcsfs.core  # after the environment is set: it reads some of it on import

        classes = {p: fsspec.get_filesystem_class(p) for p in protocols}
        config = {p: fsspec.config.conf.get(p) for p in protocols}
        for p in protocols:  # gcsfs may have been imported before the variable was set
            fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
            fsspec.config.conf[p] = {"token": "anon", "project": "test"}
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        try:
            yield server
        finally:
            for p in protocols:
                fsspec.register_implementation(p, classes[p], clobber=True)
                if config[p] is None:
                    fsspec.config.conf.pop(p, None)
                else:
                    fsspec.config.conf[p] = config[p]
            gcsfs.core.GCSFileSystem.clear_instance_cache()
