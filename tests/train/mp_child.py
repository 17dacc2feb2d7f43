"""One process of a 2-process training run on loopback, for tests/train/test_multiprocess.py.

    python -m tests.train.mp_child OUT MODEL_JSON PROCESS_ID PORT [--sigterm-at N]

4 simulated CPU devices per process (8 in all), digits data, mesh data=2,fsdp=2,tensor=2,
the config of tests/train/conftest.py's `reference` run.
--sigterm-at N: this process (only) sends itself SIGTERM after step N; every process must
then stop and save at the same step. Process 0 prints the result as JSON on stdout.
"""

import json
import os
import signal
import sys

if __name__ == "__main__":  # only then: the tests import config() from here
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax

from vitctl.train.distributed import init_distributed
from vitctl.train.loop import train
from vitctl.train.settings import TrainConfig

STEPS, BATCH, SAVE_EVERY, MESH = 6, 16, 2, "data=2,fsdp=2,tensor=2"


def config(model: str, mesh: str = MESH) -> TrainConfig:
    """Adafactor (factored moments: the model has two dims >= 128), sigmoid cross-entropy, cosine with cooldown."""
    return TrainConfig(model=model, data="digits", steps=STEPS, batch_size=BATCH, lr=3e-3, warmup=2, cooldown=2,
                       optimizer="adafactor", loss="sigmoid", save_every=SAVE_EVERY, stats_every=0, mesh=mesh)  # fmt: skip


def main(argv):
    out, model, pid, port = argv[0], argv[1], int(argv[2]), int(argv[3])
    sigterm_at = int(argv[argv.index("--sigterm-at") + 1]) if "--sigterm-at" in argv else None
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    init_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=120)

    def on_log(rec):
        if rec["step"] == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    r = train(config(model), out, on_log=on_log)
    if pid == 0:
        print(json.dumps({**r, "devices": jax.device_count(), "local_devices": jax.local_device_count()}))


if __name__ == "__main__":
    main(sys.argv[1:])
