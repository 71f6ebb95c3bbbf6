"""Reading a route's request: whole-number arguments, a JSON body taken from the tab's own
origin only, and our errors said as TensorBoard's (404 for what is missing, 400 for anything
else wrong, 415 for a body not declared as JSON, 503 while the render queue is full, 500 with
the traceback in the server's log for a bug or a fault of the machine)."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

from tensorboard import errors

from ..errors import (
    CorruptSnapshotError,
    IncompatibleRunError,
    MicroscopeError,
    NodeNotFoundError,
    PickleNotAllowedError,
    RunNotFoundError,
    StepNotFoundError,
    first_line,
)

MAX_INT = 2**62  # the largest whole number an argument may be
RETRY_AFTER_S = 2
MAX_BODY_BYTES = 1 << 20


class UnavailableError(errors.PublicError):
    """The render queue is full: 503, try again shortly."""

    error_code = "Unavailable"
    http_code = 503

    def __init__(self, details):
        super().__init__(f"Unavailable: {details}")
        self.headers.append(("Retry-After", str(RETRY_AFTER_S)))


class UnsupportedMediaTypeError(errors.PublicError):
    """A POST whose body is not declared as JSON (what a cross-site HTML form sends)."""

    error_code = "Unsupported media type"
    http_code = 415

    def __init__(self, details):
        super().__init__(f"Unsupported media type: {details}")


class InternalError(errors.PublicError):
    """A bug in tb_microscope or a fault of the machine: 500, its traceback in the server's log."""

    error_code = "Internal error"
    http_code = 500

    def __init__(self, details):
        super().__init__(details)


@contextlib.contextmanager
def public_errors() -> Iterator[None]:
    """Our errors as TensorBoard's: what is missing is a 404, anything else a user can fix a
    400 (a run's data that cannot be used says its kind too, `CorruptSnapshotError: …`, as a
    failed render does, so that the tab can name it in a small cell); TensorBoard's own errors
    pass as they are. Anything else is not the user's doing (a bare ValueError, OSError or
    KeyError is a bug, or a fault of the machine): a 500 whose traceback goes to the server's
    log, and whose message says so in a line."""
    try:
        yield
    except errors.PublicError:
        raise
    except (NodeNotFoundError, StepNotFoundError, RunNotFoundError) as e:
        raise errors.NotFoundError(str(e)) from e
    except (CorruptSnapshotError, IncompatibleRunError, PickleNotAllowedError) as e:
        raise errors.InvalidArgumentError(f"{type(e).__name__}: {e}") from e
    except MicroscopeError as e:
        raise errors.InvalidArgumentError(str(e)) from e
    except Exception as e:
        logging.getLogger(__name__).exception("a request to tb_microscope failed")
        why = first_line(e)
        raise InternalError(
            f"internal error in tb_microscope ({why}); the server's log has the traceback"
        ) from e


def int_arg(
    args: Mapping, name: str, default: int | None = None, lo: int = 0, hi: int = MAX_INT
) -> int:
    """The whole number `name` of a query or body, from `lo` to `hi`; `default` when it is not
    given (None: it must be). Anything else is a 400 saying what was wrong."""
    raw = args.get(name)
    if raw is None:
        if default is None:
            raise errors.InvalidArgumentError(f"missing query parameter {name!r}")
        return default
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise errors.InvalidArgumentError(f"{name} must be a whole number, got {raw!r}")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise errors.InvalidArgumentError(f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise errors.InvalidArgumentError(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def capped_arg(
    args: Mapping, name: str, default: int, bounds: tuple[int, int], cap: int, flag: str
) -> int:
    """`int_arg` within `bounds`, and no more than `cap`, the most this server's `flag` lets a
    request ask for: a request cannot make the server do more work than its user allowed."""
    value = int_arg(args, name, default, *bounds)
    if value > cap:
        raise errors.InvalidArgumentError(
            f"{name}={value} is more than this server does ({flag} {cap}); ask for at most "
            f"{cap}, or start TensorBoard with a larger {flag}"
        )
    return value


def check_same_site(request) -> None:
    """Refuse a request another site's page could have sent (an `<img>`, a `fetch`, a form):
    one whose `Origin` names another host than this server's, or whose `Sec-Fetch-Site` is
    neither `same-origin` (the tab) nor `none` (typed into the address bar). Routes that start
    or stop work call it; what only reads is served to anyone who can reach the server."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
        raise errors.PermissionDeniedError(
            f"a request from {origin} may not start or stop work on this server ({request.host})"
        )
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise errors.PermissionDeniedError(f"a {site} request may not start or stop work here")


def check_same_origin_json(request) -> None:
    """Refuse a request that could come from another site: only a JSON POST (what a
    cross-site HTML form cannot send), from this server's own origin (`check_same_site`)."""
    if request.method != "POST":
        raise errors.InvalidArgumentError(f"{request.path} takes a POST with a JSON body")
    if request.mimetype != "application/json":
        raise UnsupportedMediaTypeError(
            f"{request.path} takes Content-Type application/json, not {request.mimetype or 'none'}"
        )
    check_same_site(request)


def json_body(request) -> dict:
    """The JSON object a route that starts or stops work is sent, from the tab's own origin
    only (`check_same_origin_json`); a body over MAX_BODY_BYTES is a 413."""
    check_same_origin_json(request)
    request.max_content_length = MAX_BODY_BYTES  # a larger body is a 413
    try:
        body = json.loads(request.get_data() or b"{}")
    except ValueError as e:
        raise errors.InvalidArgumentError(f"the body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise errors.InvalidArgumentError("the body must be a JSON object")
    return body
