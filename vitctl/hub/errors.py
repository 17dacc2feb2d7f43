"""Hub failures: HubError, retries of transient failures, and the mapping of huggingface_hub's
errors (HTTP statuses, Xet storage, the network, the offline cache) to a HubError with a hint.

Transient failures (5xx, 429, refused or dropped connections, cut-short downloads) are retried
a few times; the rest map to a HubError naming the repo, revision and endpoint, never the token.
huggingface_hub and httpx2 are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from vitctl.errors import VitctlError

TRIES, WAIT = 3, 0.5  # transient failures: 3 tries, 0.5 s then 1 s apart
TOKEN_HINT = "set HF_TOKEN or run `hf auth login` with a token that can access the repo (vitctl never prints it)"
ENDPOINT_HINT = "check --endpoint / HF_ENDPOINT (the Hub asked)"
XET_HINT = "retry; if it keeps failing, set HF_HUB_DISABLE_XET=1 to transfer over plain HTTP instead of Xet storage"
T = TypeVar("T")


class HubError(VitctlError):
    """The Hub (or the network to it) refused or failed an operation."""


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _transient(e: BaseException) -> bool:
    """5xx/429, refused or dropped connections, timeouts and cut-short downloads: worth another try."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for c in _chain(e):
        if isinstance(c, OfflineModeIsEnabled):
            return False
        if isinstance(c, HfHubHTTPError):
            s = _status(c)
            return s is not None and (s >= 500 or s == 429)
        if isinstance(c, httpx2.TransportError) or (isinstance(c, OSError) and "Consistency check failed" in str(c)):
            return True
    return False


def _retry(fn: Callable[[], T]) -> T:
    for i in range(TRIES):
        try:
            return fn()
        except Exception as e:
            if i == TRIES - 1 or not _transient(e):
                raise
            time.sleep(WAIT * 2**i)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _hub_errors(repo_id: str, rev: str, endpoint: str, offline: bool = False) -> Iterator[None]:
    """Maps huggingface_hub and network errors to HubError/CheckpointError with a hint (never the token)."""
    try:
        yield
    except VitctlError:
        raise
    except Exception as e:
        mapped = _mapped(e, repo_id, rev, endpoint, offline)
        if mapped is None:
            raise
        raise mapped from None


def _mapped(e: Exception, repo_id: str, rev: str, endpoint: str, offline: bool) -> HubError | None:
    """The HubError for a failure of huggingface_hub or the network; None for any other error."""
    import httpx2
    from huggingface_hub import errors as he

    chain = list(_chain(e))
    first = lambda *types: next((c for c in chain if isinstance(c, types)), None)
    where = f"{repo_id}@{rev}"
    if offline and first(he.LocalEntryNotFoundError, he.OfflineModeIsEnabled):
        return HubError(
            f"{where} is not (completely) in the local Hugging Face cache, and offline mode is on",
            hint=f"pull it once online: vitctl hub pull {where} (without --offline / HF_HUB_OFFLINE=1)",
        )
    if c := xet_failure(e):
        return HubError(
            f"Xet transfer failure on {where} ({endpoint}): {type(c).__name__}: {_short(c)}",
            hint=f"{TOKEN_HINT}; then {XET_HINT}" if isinstance(c, PermissionError) else XET_HINT,
        )
    if c := first(he.RevisionNotFoundError):
        return HubError(
            f"revision '{rev}' not found in {repo_id} on {endpoint} (HTTP 404)",
            hint=f"check the branch, tag or commit SHA (the repo exists); list them with `hf repos branches {repo_id}`",
        )
    if c := first(he.RemoteEntryNotFoundError):
        return HubError(f"a file of {where} is missing on {endpoint}: {_short(c)}", hint="check the revision; the repo may be incomplete")
    if c := first(he.HfHubHTTPError):
        return _http_error(c, repo_id, where, endpoint)
    if first(httpx2.ConnectError, httpx2.TimeoutException, ConnectionError):
        return HubError(
            f"cannot reach the Hub at {endpoint}",
            hint="check --endpoint / HF_ENDPOINT and the network; cached repos also pull with --offline",
        )
    if first(httpx2.TransportError) or next((c for c in chain if isinstance(c, OSError) and "Consistency check" in str(c)), None):
        return HubError(f"the download of {where} from {endpoint} was cut short, {TRIES} tries", hint="try again; nothing was written")
    if c := first(he.LocalEntryNotFoundError):
        return HubError(
            f"cannot fetch {where} from {endpoint} and it is not in the cache: {_short(c)}",
            hint="check --endpoint / HF_ENDPOINT and the network",
        )
    return None


def _http_error(c: BaseException, repo_id: str, where: str, endpoint: str) -> HubError:
    """The HubError for an HTTP error answer of the Hub, by its status."""
    from huggingface_hub import errors as he

    status = _status(c)
    if status in (401, 403):
        return HubError(f"{endpoint} refused access to {repo_id} (HTTP {status})", hint=TOKEN_HINT)
    if isinstance(c, he.RepositoryNotFoundError) or status == 404:
        return HubError(
            f"repo {repo_id} not found on {endpoint} (HTTP 404; a private repo you cannot access answers the same)",
            hint=f"check the repo id (org/name) and {ENDPOINT_HINT}; for a private repo, {TOKEN_HINT}",
        )
    if status is not None and (status >= 500 or status == 429):
        return HubError(
            f"{endpoint} failed with HTTP {status} on {where}, {TRIES} tries", hint="the Hub is having trouble; try again later"
        )
    return HubError(f"{endpoint} answered HTTP {status} on {where}: {_short(c)}", hint="check the repo id, revision and your access")


def xet_failure(e: BaseException) -> BaseException | None:
    """The Xet storage error in `e`'s chain, if the transfer failed there: huggingface_hub's
    XetDownloadError, or any exception of the hf_xet extension (XetAuthenticationError,
    XetObjectNotFoundError, and the errors its transfer engine raises)."""
    from huggingface_hub.errors import XetDownloadError

    return next((c for c in _chain(e) if isinstance(c, XetDownloadError) or type(c).__module__.split(".")[0] == "hf_xet"), None)


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
