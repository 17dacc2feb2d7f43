"""Hub names: hf:// checkpoint URIs, repo ids and revisions, endpoints, and what each backend needs of a repo."""

from __future__ import annotations

import fnmatch
import os
import re
import urllib.parse

from vitctl.errors import ConfigError
from vitctl.formats.layout import CONFIG, PARAMS, SAFETENSORS, SAFETENSORS_INDEX
from vitctl.hub.card import PROBE_REPORT, VERIFY_REPORT

SCHEME = "hf://"
CARD = "README.md"
# What each backend needs from a repo (fnmatch patterns, as huggingface_hub's allow_patterns).
NEEDS = {
    "config": [CONFIG],
    "torch": [CONFIG, SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors"],
    "jax": [CONFIG, f"{PARAMS}/*"],
}
NEEDS["all"] = sorted({*NEEDS["torch"], *NEEDS["jax"], CARD, VERIFY_REPORT, PROBE_REPORT})
WEIGHT_PATTERNS = [SAFETENSORS, SAFETENSORS_INDEX, "model-*-of-*.safetensors", f"{PARAMS}/*"]
# org/name; the name is the default output folder of a pull, so it cannot be "." or start with one.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9_][\w.-]*")
REVISION = re.compile(r"[\w.+-]+(/[\w.+-]+)*")  # a branch, tag or SHA; "refs/pr/1" has slashes
COMMIT = re.compile(r"[0-9a-f]{40}")


def is_hub_uri(arg: str | os.PathLike) -> bool:
    return str(arg).startswith(SCHEME)


def parse_repo(spec: str) -> tuple[str, str | None]:
    """ "hf://org/name@rev", "org/name@rev" or "org/name" -> (repo_id, rev or None)."""
    s = str(spec).removeprefix(SCHEME)
    repo_id, _, rev = s.partition("@")
    bad_rev = _ and not (REVISION.fullmatch(rev) and all(p not in (".", "..") for p in rev.split("/")))
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or bad_rev:
        raise ConfigError(f"'{spec}' is not a Hub repo id", hint="write it as org/name or org/name@revision (a branch, tag or commit SHA)")
    return repo_id, rev or None


def check_endpoint(endpoint: str | None) -> str | None:
    """The Hub URL from --endpoint, else HF_ENDPOINT (None when neither is set), if it is an
    http(s) URL with a host; else a usage error (before anything is read or written)."""
    source, url = ("--endpoint", endpoint) if endpoint is not None else ("HF_ENDPOINT", os.environ.get("HF_ENDPOINT") or None)
    if url is None:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() or ord(c) < 32 for c in url)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(
            f"{source} must be an http(s) URL, got {url!r}",
            hint="for example https://huggingface.co, or http://127.0.0.1:8080 for a local Hub",
        )
    return url.rstrip("/")


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)
