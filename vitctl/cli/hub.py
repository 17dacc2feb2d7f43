"""`vitctl hub push|pull`: share checkpoints on a Hugging Face Hub. Thin: parse, call vitctl.hub, print.

stdout: push prints the commit URL, pull the output directory; with --json one object
(push: {"repo_id", "revision", "commit", "url", "private", "files": [{path, size, sha256,
lfs}], "deleted", "bytes", "verified", "verify_report", "probe_report", "license", "scrubbed" (files
uploaded with local paths reduced to names: config.json of an older checkpoint), "source"}; pull: {"repo_id",
"commit", "path", "files", "bytes", "refetched", "offline", "endpoint", "backend",
"formats", "snapshot"}). stderr: huggingface_hub's progress bars, notes. The endpoint is
--endpoint, else HF_ENDPOINT, else huggingface.co; the token comes from HF_TOKEN or the
saved login and is never printed. Exit codes: 0 done; 1 the Hub or the download failed,
a Xet transfer failure, or the repo is damaged or hostile (a file name outside the checkpoint, a config.json that
does not describe the weights; nothing written), or push found a file outside the
checkpoint or a file holding a local path (nothing uploaded); 2 usage (bad repo id, an --endpoint that is not an http(s)
URL, output exists without --force or is not a directory vitctl wrote); 130 interrupted
(Ctrl-C or SIGTERM; nothing written).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from vitctl.cli._options import ForceOpt, JsonOpt, err, out, print_json

commands = typer.Typer(no_args_is_help=True, help="Share checkpoints on the Hugging Face Hub: push, pull (pinned to a commit).")

PUSH_EXAMPLES = """Examples:

  vitctl hub push ckpt/ti-pt me/vit22b-ti

  vitctl hub push runs/demo/jax me/demo --include-jax --private --revision exp1

  vitctl hub push ckpt/ti-pt me/vit22b-ti --endpoint http://127.0.0.1:8080 --json
"""
PULL_EXAMPLES = """Examples:

  vitctl hub pull me/vit22b-ti --out ckpt/ti --backend torch

  vitctl hub pull me/vit22b-ti@exp1 --out ckpt/ti-exp1

  HF_HUB_OFFLINE=1 vitctl hub pull me/vit22b-ti --out ckpt/ti-again
"""


class PullBackend(str, enum.Enum):
    jax = "jax"
    torch = "torch"
    all = "all"


EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint", help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co).", show_default=False)
]


@commands.command("push", epilog=PUSH_EXAMPLES)
def push(
    ckpt: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="Checkpoint directory (config.json + weights).", show_default=False)
    ],
    repo_id: Annotated[str, typer.Argument(metavar="REPO_ID", help="org/name; created when missing.", show_default=False)],
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Branch to commit to (created from main when missing; default: main).", show_default=False),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (when it does not exist yet).")] = False,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.", show_default=False)] = None,
    include_jax: Annotated[bool, typer.Option("--include-jax", help="Also upload params/ (the Orbax JAX weights).")] = False,
    license: Annotated[
        str,
        typer.Option(
            "--license",
            help="License of the weights for the model card's YAML metadata: a Hub license id (apache-2.0, mit, cc-by-4.0, ...). "
            "The default 'other' claims none: the weights' license is yours to state.",
        ),
    ] = "other",
    endpoint: EndpointOpt = None,
    json: JsonOpt = False,
) -> None:
    """Upload a checkpoint (config, weights, a generated model card) as one commit, then check the remote hashes."""
    from vitctl import hub

    result = hub.push(
        ckpt, repo_id, revision=revision, private=private, message=message, include_jax=include_jax, endpoint=endpoint, license=license
    )
    if json:
        print_json(result)
        return
    out.print(f"{result['url']}/tree/{result['commit']}", markup=False, soft_wrap=True)
    err.print(
        f"{len(result['files'])} files, {result['bytes']:,} bytes, committed to {result['repo_id']}@{result['revision']} "
        f"({result['commit'][:12]}); sizes and sha256 match the local files",
        markup=False,
    )
    err.print(f"next: vitctl hub pull {result['repo_id']}@{result['commit']}", markup=False)


@commands.command("pull", epilog=PULL_EXAMPLES)
def pull(
    spec: Annotated[
        str, typer.Argument(metavar="REPO_ID[@REV]", help="org/name, optionally @branch, @tag or @commit-sha.", show_default=False)
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Checkpoint directory to create (default: ./NAME, the repo's name).", show_default=False),
    ] = None,
    backend: Annotated[PullBackend, typer.Option("--backend", help="Download only what this backend needs.")] = PullBackend.all,
    offline: Annotated[bool, typer.Option("--offline", help="Use only the local Hugging Face cache (as HF_HUB_OFFLINE=1).")] = False,
    endpoint: EndpointOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Download a checkpoint pinned to a commit SHA, check every file, and write it atomically."""
    from vitctl import hub

    result = hub.pull(spec, out_dir, backend=backend.value, offline=offline, endpoint=endpoint, force=force)
    if json:
        print_json(result)
        return
    print(result["path"])
    again = f", re-fetched {len(result['refetched'])} damaged" if result["refetched"] else ""
    err.print(
        f"{result['repo_id']}@{result['commit']}: {len(result['files'])} files, {result['bytes']:,} bytes checked{again}"
        f"{' (offline, from the cache)' if result['offline'] else ''}",
        markup=False,
    )
    err.print(f"next: vitctl info {result['path']}", markup=False)
