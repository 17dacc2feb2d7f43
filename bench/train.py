"""Train-step throughput of vitctl-jax (the step `vitctl train` runs) against a plain timm +
torch AdamW loop on the same configuration, and its MFU against the GEMM peak measured
in the same run.

    python bench/train.py [--size S] [--batch-size 8] [--iters 3] [--json]

Configuration: vitctl `vit22b-{size}/16` with pool "tok" (parallel block, QK-norm, RMSNorm,
class token), 224 px, fp32; timm's model is built from the same config by
vitctl.convert.timm.timm_spec (`vit_base_patch16_xp_224`-like), so both compute the same
function and the same FLOPs. Also vitctl-torch + torch AdamW on the same config.
- vitctl-jax: vitctl.train.step.Setup's jitted step (softmax cross-entropy, AdamW,
  global-norm clipping 1.0, donated state) on one device.
- timm / vitctl-torch: cross-entropy, backward, torch.optim.AdamW, zero_grad.
Measurement (vitctl/bench/): GEMM peaks of torch (MKL, oneDNN) and XLA on the model's
own shapes first; one warm-up step each, then --iters timed rounds interleaving the
competitors, a quiet gate before each timed call; a result is the best round. MFU =
3 x forward FLOPs per step (vitctl.bench.flops) / step time / the best fp32 GEMM rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rich.console import Console

from vitctl import bench as B


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="S", help="ViT size of vit22b-SIZE/16 (default S)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--max-wait", type=float, default=60, help="seconds to wait, over the run, for other processes to go quiet")
    p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} on stdout, nothing else there')
    args = p.parse_args(argv)
    mode = dataclasses.replace(
        B.MODES["full"], name="train", size=args.size, train_batch=args.batch_size, iters=args.iters, gate_budget_s=args.max_wait
    )
    report = B.run(mode, ("gemm", "torch-train", "jax-train"), log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    console = Console(width=200, highlight=False)
    console.print(B.rows_table(f"bench/train.py: {report.machine['cpu']}", report.rows))
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"load: {report.load['describe']}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
