"""What the object storage modules share: URLs, their filesystems (fsspec, imported only when a
URL is used), the local folders a run is mirrored and staged in, an object's version, and the
errors a store's failures become."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from ...errors import MicroscopeError, RunNotFoundError
from ..paths import PLUGIN_NAME, remote_protocol, user_cache_root

# botocore's defaults (60 s reads, 5 attempts) would hold a tab's request for minutes while the
# store does not answer; a read timeout bounds each socket read, not a whole download.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 3}}
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# the variables that name another endpoint (an S3-compatible store, a GCS emulator), by extra
_ENDPOINTS = {"s3": "AWS_ENDPOINT_URL / S3_ENDPOINT", "gcs": "STORAGE_EMULATOR_HOST"}


class RemoteUnavailableError(MicroscopeError):
    """The object store could not be reached, or refused a request."""


def normalize(url: str) -> str:
    """`url` without a trailing slash (the run's name and cache key)."""
    return url.rstrip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([normalize(url), *(p.strip("/") for p in parts if p and p != ".")])


def filesystem(url: str):
    """(the fsspec filesystem of `url`, the path in it), without listings cached (a listing must
    show new objects); S3's endpoint from AWS_ENDPOINT_URL, else TensorBoard's S3_ENDPOINT."""
    protocol = remote_protocol(url)
    try:
        import fsspec
    except ImportError as e:
        raise MicroscopeError(
            f"{url} needs fsspec: pip install 'tb-microscope[{_EXTRAS.get(protocol, 's3')}]'"
        ) from e
    options: dict = {"use_listings_cache": False}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = S3_CONFIG
        endpoint = os.environ.get("S3_ENDPOINT")
        if endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.url_to_fs(url, **options)
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        install = f"pip install 'tb-microscope[{extra}]'" if extra else str(e)
        raise MicroscopeError(f"{protocol}:// URLs need another package: {install}") from e
    except ValueError as e:
        raise MicroscopeError(f"{url} is not a URL fsspec knows ({e})") from e
    return fs, path.rstrip("/")


def plugin_prefix(path: str) -> str:
    return f"{path}/plugins/{PLUGIN_NAME}"


def _place(url: str) -> str:
    return hashlib.sha256(normalize(url).encode()).hexdigest()[:16]


def mirror_dir(url: str) -> Path:
    return user_cache_root() / "remote" / _place(url)


def staging_dir(url: str) -> Path:
    return user_cache_root() / "remote-upload" / _place(url)


def object_version(info: dict) -> str:
    """What changes when an object is replaced: its ETag (S3), generation or MD5 (GCS), else its
    modification time; with its size."""
    for key in ("ETag", "etag", "generation", "md5Hash", "LastModified", "mtime", "created"):
        if info.get(key) is not None:
            tag = hashlib.sha256(str(info[key]).encode()).hexdigest()[:16]
            return f"o{tag}-{info.get('size')}"
    return f"s-{info.get('size')}"


def remote_error(e: BaseException, what: str, url: str) -> MicroscopeError:
    """The error to raise for `e`, raised while doing `what` at `url`."""
    name = type(e).__name__
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else name
    protocol = remote_protocol(url)
    endpoint = _ENDPOINTS.get(_EXTRAS.get(protocol, ""))
    endpoint = f" (and {endpoint}, if you use one)" if endpoint else ""
    if "Credentials" in name or "credentials" in text.lower():
        how = {
            "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
            "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or run gcloud auth application-default "
            "login",
        }.get(_EXTRAS.get(protocol, protocol)[:2], "give the filesystem its credentials")
        return RemoteUnavailableError(f"no credentials to {what} at {url} ({text}): {how}")
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        return RunNotFoundError(
            f"could not {what} at {url}: {text}. Check that the bucket '{bucket}' exists (create "
            f"it first) and that the URL{endpoint} is right"
        )
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return RemoteUnavailableError(
            f"access denied to {what} at {url} ({text}); check that the credentials in use may "
            "read and write there"
        )
    return RemoteUnavailableError(
        f"could not {what} at {url} ({name}: {text}); check that the store is reachable{endpoint}"
    )


def check_access(url: str) -> None:
    """Write and remove a small object under the run's plugin prefix, so that a missing bucket or
    missing credentials are said when a Logger starts, not at its first upload."""
    fs, path = filesystem(url)
    probe = f"{plugin_prefix(path)}/.access-check-{uuid.uuid4().hex[:12]}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:
        raise remote_error(e, "write tb_microscope's files", url) from e
