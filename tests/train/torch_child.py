"""One process of a `vitctl train --backend torch` run, for tests/train/test_torch_train.py.

    python -m tests.train.torch_child OUT MODEL_JSON [--resume] [--sigterm-at STEP] [--kill-at STEP]

The process group comes from the environment the test sets (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, as torchrun sets them); without it, a world of one. Deterministic algorithms on,
one thread, so two runs on one machine compute bit for bit the same. --sigterm-at: this
process sends itself SIGTERM when step STEP is logged (the loop saves and stops every process
at the next step boundary). --kill-at: SIGKILL when step STEP is logged (no save). Process 0
prints the result as one JSON line.
"""

import argparse
import json
import os
import signal

import torch

from vitctl.train.settings import TrainConfig
from vitctl.train.torch_loop import train


def config(model: str) -> TrainConfig:
    """The run every multi-process and resume test of the torch trainer uses: 6 steps of digits, a state every 2."""
    return TrainConfig(model=model, data="digits", steps=6, batch_size=32, lr=3e-3, warmup=1, save_every=2, keep=5, stats_every=3,
                       seed=0, backend="torch")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("model")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sigterm-at", type=int)
    ap.add_argument("--kill-at", type=int)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    def on_log(rec):
        if rec["step"] == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if rec["step"] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train(config(args.model), args.out, resume=args.resume, on_log=on_log)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
