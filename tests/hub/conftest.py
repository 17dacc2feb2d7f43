"""Fixtures for the Hub tests: a loopback Hub server per test, tiny checkpoints, and a runner
for the real `vitctl` CLI in a subprocess.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET when it is
imported, so the CLI runs in a fresh interpreter with them set: Xet off (it needs a storage
service that cannot run here), the endpoint the loopback server, HF_HOME a temporary
directory (the user's cache is never touched) and a known token.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.conftest import random_params, tiny
from tests.hub.server import serve

TOKEN = "hf_vitctlTEST0secret0token0do0not0print"
CFG = tiny(depth=1)


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def hub():
    """A Hub-compatible server on 127.0.0.1 (ephemeral port) that requires TOKEN for writes."""
    server, thread = serve(token=TOKEN)
    yield server
    server.release_all()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def vitctl(hub, tmp_path):
    """Runs `python -m vitctl ARGS` with the Hub environment; env= adds or overrides (None removes) variables."""
    home = tmp_path / "hf-home"

    def run(*args, env=None, timeout=120):
        e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        e.update(HF_HOME=str(home), HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
                 HF_HUB_DISABLE_PROGRESS_BARS="1", VITCTL_DEBUG="1", PYTHONPATH=str(Path(__file__).parents[2]))  # fmt: skip
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        p = subprocess.run(
            [sys.executable, "-m", "vitctl", *map(str, args)], env=e, capture_output=True, text=True, timeout=timeout, check=False
        )
        return Run(p.returncode, p.stdout, p.stderr)

    run.home = home
    return run


def torch_ckpt(path: Path, seed: int = 0, max_shard_bytes: int | None = 20_000, cfg=CFG) -> Path:
    """A sharded torch checkpoint (config.json + shards + index) with distinct random weights."""
    from vitctl import checkpoint as ckpt
    from vitctl.convert.mapping import jax_to_torch
    from vitctl.formats import layout

    path.mkdir(parents=True)
    layout.save_torch(path, jax_to_torch(random_params(cfg, seed), cfg), max_shard_bytes)
    ckpt.write_config(path, cfg, {"source_format": "test", "source": "random_params", "seed": seed})
    return path


def repo_files(ckpt: Path) -> dict[str, bytes]:
    return {p.relative_to(ckpt).as_posix(): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def same_weights(a: Path, b: Path) -> bool:
    from vitctl.formats import layout

    wa, wb = layout.load_torch(a), layout.load_torch(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
