"""The sandbox in which the docs tests run commands as a user types them: a fresh directory,
`vitctl` on PATH (this interpreter's), the loopback Hub of tests/hub as HF_ENDPOINT with a
token in HF_TOKEN, HF_USER=me, and HF_HOME and VITCTL_CACHE inside the sandbox (the user's
caches are never touched; nothing reaches the network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from tests.hub.conftest import TOKEN
from tests.hub.server import serve

ROOT = Path(__file__).resolve().parents[2]
HF_USER = "me"


class Ran(NamedTuple):
    script: str
    returncode: int
    stdout: str
    stderr: str


class Sandbox:
    """A directory, a Hub, and the environment a README reader would have."""

    def __init__(self, root: Path):
        self.root = root
        self.hub, self._thread = serve(token=TOKEN)
        bindir = str(Path(sys.executable).parent)  # .venv/bin: `vitctl` as installed here
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "VITCTL_", "JAX_"))}
        env.update(
            PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT), HOME=str(root / "home"),
            HF_HOME=str(root / "home" / "hf"), VITCTL_CACHE=str(root / "home" / "vitctl-cache"),
            HF_ENDPOINT=self.hub.url, HF_TOKEN=TOKEN, HF_USER=HF_USER, HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", COLUMNS="100",
        )  # fmt: skip
        env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not a user's
        self.env = env
        (root / "home").mkdir(parents=True, exist_ok=True)

    def sh(self, script: str, timeout: float = 600, cwd: Path | None = None) -> Ran:
        """Runs `script` with bash as a user's shell would (stops at the first failing command)."""
        p = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + script],
            check=False, cwd=cwd or self.root, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return Ran(script, p.returncode, p.stdout, p.stderr)

    def close(self) -> None:
        self.hub.release_all()
        self.hub.shutdown()
        self.hub.server_close()
        self._thread.join(5)
