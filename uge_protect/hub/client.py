"""Talking to the Hub: the client, the token, retries with backoff, and one-line errors.

Every call of the upload goes through :func:`call_hub`. A call that fails with a rate limit
(HTTP 429), a server error (5xx) or a dropped connection is tried again, at most
``RetryPolicy.attempts`` times in all, after an exponentially growing wait with jitter, or after
what the server's ``Retry-After`` header asks for. Any other error (401, 403, 404, ...) is final
at once. Each retry is logged (logger ``uge_protect.hub.client``); the final failure becomes one
:class:`UserError` naming the repository.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterable, Protocol, TypeVar

from uge_protect import __version__
from uge_protect.errors import UserError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class HubClient(Protocol):
    """The part of :class:`huggingface_hub.HfApi` the upload uses (tests inject a fake)."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def create_branch(self, repo_id: str, **kwargs: Any) -> Any: ...

    def list_repo_tree(self, repo_id: str, **kwargs: Any) -> Iterable[Any]: ...

    def create_commit(self, repo_id: str, operations: Iterable[Any], **kwargs: Any) -> Any: ...


def default_client(token: str, endpoint: str | None = None) -> HubClient:
    """A :class:`huggingface_hub.HfApi` that identifies uploads as uge-protect's. ``endpoint``
    defaults to ``HF_ENDPOINT`` or https://huggingface.co."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="uge-protect", library_version=__version__)


def validate_repo_id(repo_id: str) -> str:
    """``owner/name`` or ``name`` as the Hub accepts it; a clear error otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    try:
        _validate(repo_id)
    except HFValidationError as exc:
        raise UserError(f"invalid repository id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    if repo_id.startswith(("datasets/", "models/", "spaces/")):
        raise UserError(f"invalid repository id {repo_id!r}: give OWNER/NAME without the 'datasets/' prefix")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN``, else the login cache (``hf auth login``)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` "
                        "(a token with write access), or use --dry-run STAGING_DIR to upload nothing")
    return found


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def hub_error(exc: BaseException, repo_id: str, action: str) -> UserError:
    """One clear line for an error of the Hub client."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(exc)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or use --dry-run STAGING_DIR")
    if isinstance(exc, RevisionNotFoundError):
        return UserError(f"revision not found in {repo_id} while {action}: {first_line}")
    if status == 401:
        return UserError(f"the Hugging Face token was rejected (401) while {action}: "
                         "log in again with `hf auth login` or set HF_TOKEN to a valid token")
    if status == 403:
        return UserError(f"this token may not write to {repo_id} (403 forbidden) while {action}: "
                         "use a token with write access to that namespace")
    if status == 429:
        return UserError(f"the Hub rate-limited {action} (429; about 128 commits per hour per repository): "
                         "wait a few minutes")
    if isinstance(exc, RepositoryNotFoundError) or status == 404:
        return UserError(f"dataset repository {repo_id} not found or not accessible with this token while {action}")
    if isinstance(exc, HfHubHTTPError):
        return UserError(f"the Hub refused {action} ({status}): {first_line}")
    return UserError(f"could not reach the Hub while {action} ({first_line})")


def _http_libraries() -> list[Any]:
    """The HTTP libraries huggingface_hub may use: httpx2 (version 2), httpx or requests (older)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx", "requests"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:  # pragma: no cover - depends on the huggingface_hub version
            pass
    return found


def client_errors() -> tuple[type[BaseException], ...]:
    """The errors of a Hub call that :func:`hub_error` explains."""
    from huggingface_hub.errors import HfHubHTTPError

    libraries = [lib.RequestException if lib.__name__ == "requests" else lib.HTTPError for lib in _http_libraries()]
    return (HfHubHTTPError, *libraries, ConnectionError, TimeoutError)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Errors of a connection that failed or timed out (what huggingface_hub's own backoff retries)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for lib in _http_libraries():
        if lib.__name__ == "requests":
            found += [lib.ConnectionError, lib.Timeout]
        else:
            found += [lib.TimeoutException, lib.NetworkError, lib.RemoteProtocolError]
    return tuple(found)


def is_transient(exc: BaseException) -> bool:
    """Whether trying the call again may succeed: HTTP 429 or 5xx, or a connection that failed.
    Offline mode and every other HTTP status are final."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return False
    status = _status(exc)
    if status is not None:
        return status == 429 or 500 <= status < 600
    return isinstance(exc, _connection_errors())


def retry_after(exc: BaseException, now: datetime | None = None) -> float | None:
    """The wait in seconds that the response's ``Retry-After`` header asks for (seconds or an
    HTTP date), or None without one."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying a failed Hub call again.

    The wait before retry ``n`` (1, 2, ...) is ``min(max_delay, base_delay * 2**(n-1))``, scaled
    by a random factor in [0.5, 1) (``jitter`` returns a number in [0, 1)), unless the server sent
    ``Retry-After``: then exactly that, and a wait above ``max_retry_after`` ends the retries.
    ``sleep`` waits (tests pass one that only records)."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 600.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("a retry policy needs at least one attempt")

    def delay(self, retry: int, asked: float | None = None) -> float:
        """Seconds to wait before retry number ``retry``; ``asked``: the server's Retry-After."""
        if asked is not None:
            return asked
        return min(self.max_delay, self.base_delay * 2 ** (retry - 1)) * (0.5 + 0.5 * self.jitter())


def call_hub(call: Callable[[], T], repo_id: str, action: str, policy: RetryPolicy) -> T:
    """``call()``, tried again on transient errors as ``policy`` says; a :class:`UserError`
    (see :func:`hub_error`) when it fails for good."""
    errors = client_errors()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except errors as exc:
            if not is_transient(exc):
                raise hub_error(exc, repo_id, action) from None
            asked = retry_after(exc)
            too_long = asked is not None and asked > policy.max_retry_after
            if attempt >= policy.attempts or too_long:
                note = f"gave up on {repo_id} after {attempt} attempt{'s' if attempt > 1 else ''}"
                if too_long:
                    note += f"; the Hub asks to wait {asked:.0f} s before the next one"
                raise UserError(f"{hub_error(exc, repo_id, action)} ({note})") from None
            wait = policy.delay(attempt, asked)
            reason = f"HTTP {_status(exc)}" if _status(exc) is not None else type(exc).__name__
            logger.warning("%s failed for %s (%s); retry %d of %d in %.1f s%s", action, repo_id, reason, attempt,
                           policy.attempts - 1, wait, " (as the Hub asks)" if asked is not None else "")
            policy.sleep(wait)
