"""A training run in its own process, for the SIGKILL-and-resume test.

    python -m tests.train.resume_child OUT MODEL_JSON STEPS SAVE_EVERY [--resume] [--slow-after N]
        [--stream DATA --workers W --augment SPEC]

Uses the in-memory stand-in data; --slow-after N sleeps 1 s before each batch after
the N-th, so the parent can kill it between checkpoints. --stream DATA: vitctl's own input
pipeline instead (records read on demand, grain with W workers, the augmentation SPEC),
with the settings of tests/train/mp_child.py's stream_config; --slow-after then sleeps after each logged step past N.
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
if os.environ.get("VITCTL_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["VITCTL_TEST_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from tests.train import standin
from tests.train.mp_child import stream_config
from vitctl.train.loop import train
from vitctl.train.settings import TrainConfig


def main(argv):
    out, model, steps, save_every = argv[0], argv[1], int(argv[2]), int(argv[3])
    slow_after = int(argv[argv.index("--slow-after") + 1]) if "--slow-after" in argv else None

    class Loader(standin.Loader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if slow_after is not None and i >= slow_after:
                    time.sleep(1.0)
                yield batch

    if "--stream" in argv:
        workers, augment = int(argv[argv.index("--workers") + 1]), argv[argv.index("--augment") + 1]
        tcfg = stream_config(model, steps, save_every, argv[argv.index("--stream") + 1], workers, augment)

        def on_log(rec):
            if slow_after is not None and rec["step"] > slow_after:
                time.sleep(1.0)

        train(tcfg, out, resume="--resume" in argv, on_log=on_log)
        return
    tcfg = child_config(model, steps, save_every)
    train(tcfg, out, resume="--resume" in argv, dataset=standin.make_dataset(), loader_cls=Loader, prepare_fn=standin.prepare)


def child_config(model, steps, save_every, mesh=""):
    return TrainConfig(model=model, steps=steps, batch_size=8, lr=3e-3, warmup=2, save_every=save_every, stats_every=2, mesh=mesh)


if __name__ == "__main__":
    main(sys.argv[1:])
