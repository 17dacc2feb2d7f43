"""Push and pull vitctl checkpoints on the Hugging Face Hub (huggingface_hub 2.x).

- names.py     hf:// URIs, repo ids, revisions, endpoints; what each backend needs of a repo
- download.py  `resolve_checkpoint("hf://org/name@rev")`, `fetch` into the Hugging Face cache, `pull`
- upload.py    `push(ckpt, repo_id)`: one checked commit, nothing local published
- checks.py    what a fetched repo must pass: listings, hashes, safetensors headers, config.json
- card.py      the generated model card and the reports that go up with the weights
- errors.py    HubError, retries of transient failures, huggingface_hub's errors mapped to hints
- client.py    the huggingface_hub client, imported on first use, its response headers checked

A Hub repo is a stranger's: every name in its listing and index passes untrusted.check_name
before anything is downloaded, and the response headers that huggingface_hub turns into
cache paths (ETag, X-Repo-Commit) are checked the same way (client._check_headers).
Tokens come from huggingface_hub's usual sources (HF_TOKEN, the saved login); vitctl never
reads, prints or logs them. huggingface_hub is imported inside the functions that need it,
so `import vitctl.hub` and local checkpoint paths stay free of it.
"""

from vitctl.hub.card import (
    DEFAULT_LICENSE,
    PROBE_REPORT,
    VERIFY_REPORT,
    find_probe_report,
    find_verify_report,
    model_card,
    public_report,
)
from vitctl.hub.checks import DAMAGED_REPO, check_config, check_files
from vitctl.hub.download import fetch, pull, resolve_checkpoint
from vitctl.hub.errors import TRIES, WAIT, HubError, _hub_errors, xet_failure
from vitctl.hub.names import CARD, COMMIT, NEEDS, REPO_ID, REVISION, SCHEME, WEIGHT_PATTERNS, check_endpoint, is_hub_uri, parse_repo
from vitctl.hub.upload import check_public, checkpoint_files, local_markers, push

__all__ = [
    "CARD", "COMMIT", "DAMAGED_REPO", "DEFAULT_LICENSE", "NEEDS", "PROBE_REPORT", "REPO_ID", "REVISION", "SCHEME", "TRIES",
    "VERIFY_REPORT", "WAIT", "WEIGHT_PATTERNS", "HubError", "_hub_errors", "check_config", "check_endpoint", "check_files",
    "check_public", "checkpoint_files", "fetch", "find_probe_report", "find_verify_report", "is_hub_uri", "local_markers",
    "model_card", "parse_repo", "public_report", "pull", "push", "resolve_checkpoint", "xet_failure",
]  # fmt: skip
