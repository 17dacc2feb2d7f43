"""One process of a 2-process training run on loopback, for tests/train/test_multiprocess.py.

    python -m tests.train.mp_child OUT MODEL_JSON PROCESS_ID PORT [--sigterm-at N] [--stream DATA]
    python -m tests.train.mp_child --load SRC[,SRC...] PROCESS_ID PORT

4 simulated CPU devices per process (8 in all), digits data, mesh data=2,fsdp=2,tensor=2,
the config of tests/train/conftest.py's `reference` run.
--sigterm-at N: this process (only) sends itself SIGTERM after step N; every process must
then stop and save at the same step. Process 0 prints the result as JSON on stdout.
--stream DATA: vitctl's input pipeline on DATA (an ImageFolder) with the settings of
stream_config (1 grain worker per process, augmentation) on STREAM_MESH.
--load: each process loads every SRC into the sharded model as `vitctl train --init-from` does
(on LOAD_MESH: fsdp=4,tensor=2, so that each process holds half of every FSDP-sharded
parameter) and prints, as JSON, the bytes it read, the bytes its devices hold, and whether
every shard it holds equals the checkpoint's values bit for bit.
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
STREAM_MESH, STREAM_AUGMENT = "data=8", "inception_crop|flip_lr"
LOAD_MESH = "fsdp=4,tensor=2"  # data=2 outermost would give each process a whole replica to read


def config(model: str, mesh: str = MESH) -> TrainConfig:
    """Adafactor (factored moments: the model has two dims >= 128), sigmoid cross-entropy, cosine with cooldown."""
    return TrainConfig(model=model, data="digits", steps=STEPS, batch_size=BATCH, lr=3e-3, warmup=2, cooldown=2,
                       optimizer="adafactor", loss="sigmoid", save_every=SAVE_EVERY, stats_every=0, mesh=mesh)  # fmt: skip


def stream_config(model, steps, save_every, data, workers, augment, mesh="", **kw):
    """A run on vitctl's own input pipeline (an ImageFolder the test wrote), held-out evaluation included."""
    return TrainConfig(model=model, data=data, steps=steps, batch_size=8, lr=3e-3, warmup=2, save_every=save_every, stats_every=0,
                       eval_every=4, image_size=16, mesh=mesh, workers=workers, augment=augment, eval_augment="resize_small(1.143)|central_crop", **kw)  # fmt: skip


def main(argv):
    out, model, pid, port = argv[0], argv[1], int(argv[2]), int(argv[3])
    sigterm_at = int(argv[argv.index("--sigterm-at") + 1]) if "--sigterm-at" in argv else None
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    init_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=120)

    def on_log(rec):
        if rec["step"] == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    if "--stream" in argv:
        tcfg = stream_config(model, STEPS, SAVE_EVERY, argv[argv.index("--stream") + 1], 1, STREAM_AUGMENT, mesh=STREAM_MESH)
    else:
        tcfg = config(model)
    r = train(tcfg, out, on_log=on_log)
    if pid == 0:
        print(json.dumps({**r, "devices": jax.device_count(), "local_devices": jax.local_device_count()}))


def load_main(argv):
    import numpy as np

    from vitctl.formats import layout
    from vitctl.params import stack
    from vitctl.train.distributed import mesh_for
    from vitctl.train.init_from import load_into, open_source
    from vitctl.train.step import get_setup

    sources, pid, port = argv[0].split(","), int(argv[1]), int(argv[2])
    init_distributed(f"127.0.0.1:{port}", 2, pid, timeout_s=120)
    report = {}
    for src in sources:
        tcfg = TrainConfig(init_from=src, mesh=LOAD_MESH, batch_size=8)
        with open_source(tcfg) as ckpt:
            setup = get_setup(ckpt.cfg, tcfg, mesh_for(LOAD_MESH))
            ckpt.read_log = []
            params, _ = load_into(ckpt, ckpt.cfg, setup.abstract["params"])
            log, ckpt.read_log = ckpt.read_log, None
            want = stack(ckpt.params(), ckpt.cfg.depth)  # read whole only now, to compare
        own, equal = 0, True
        for name, arr in layout.flatten(params).items():
            shards = {str(s.index): s for s in arr.addressable_shards}  # devices holding the same slice: read once
            own += sum(s.data.nbytes for s in shards.values())
            equal &= all(np.array_equal(np.asarray(s.data), want[name][s.index]) for s in arr.addressable_shards)
        report[src] = {"read": sum(n for *_, n in log), "own": own, "total": sum(w.nbytes for w in want.values()), "equal": bool(equal),
                       "q_rows": sorted({(i[0].start, i[0].stop) for n, i, _ in log if n == "blocks/0/q/kernel"})}  # fmt: skip
    print(json.dumps({"process": pid, "local_devices": jax.local_device_count(), **report}))


if __name__ == "__main__":
    load_main(sys.argv[2:]) if sys.argv[1] == "--load" else main(sys.argv[1:])
