"""The huggingface_hub client vitctl uses: imported on first use, with a guard on the response
headers that huggingface_hub turns into cache paths (ETag, X-Repo-Commit), since a hostile
server could otherwise make it write outside the Hugging Face cache."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from vitctl.errors import MissingDependencyError
from vitctl.hub.errors import HubError
from vitctl.hub.names import check_endpoint

# huggingface_hub names cache files after these response headers (blobs/ETAG, snapshots/COMMIT):
# each must be one plain path segment.
CACHE_NAME_HEADERS = ("X-Repo-Commit", "ETag", "X-Linked-Etag", "X-Xet-Hash")
SAFE_SEGMENT = re.compile(r"[\w+=-][\w.+=-]{0,254}")


def _hf():
    """huggingface_hub, its HTTP client answering every response to _check_headers first."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise MissingDependencyError(f"the Hub commands need huggingface_hub ({e})", hint="pip install 'vitctl[hub]'") from None
    global _guarded
    if not _guarded:
        from huggingface_hub.utils import _http

        def client_factory():
            client = _http.default_client_factory()
            client.event_hooks = {**client.event_hooks, "response": [*client.event_hooks["response"], _check_headers]}
            return client

        huggingface_hub.set_client_factory(client_factory)
        _guarded = True
    return huggingface_hub


_guarded = False


def _check_headers(response: Any) -> None:
    """Refuses a file response whose headers huggingface_hub would turn into a path that is not one
    plain segment (blobs/{ETag}, snapshots/{X-Repo-Commit}): a hostile server could make it write
    anywhere. Runs on every response huggingface_hub's client receives, before it reads them."""
    if "/resolve/" not in response.url.path:
        return
    for header in CACHE_NAME_HEADERS:
        value = response.headers.get(header)
        name = value if value is None or header == "X-Repo-Commit" else value.lstrip("W/").strip('"')  # as huggingface_hub strips it
        if name is not None and not SAFE_SEGMENT.fullmatch(name):
            raise HubError(
                f"{response.url.host} answered {urllib.parse.unquote(response.url.path)} with {header}: {value!r}, "
                "which would name a file outside the Hugging Face cache",
                hint="the endpoint is damaged or hostile: do not use it",
            )


def _endpoint(endpoint: str | None, hf: Any) -> str:
    return check_endpoint(endpoint) or hf.constants.ENDPOINT.rstrip("/")
