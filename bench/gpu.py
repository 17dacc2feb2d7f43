"""The GPU check: vitctl's forward and train step on one NVIDIA GPU in bf16, as MFU.

    python bench/gpu.py                      # B/16 and a ~1B config, torch and JAX, <= 5 min
    python bench/gpu.py --peak-tflops 989    # another chip's dense bf16 peak
    python bench/gpu.py --smoke              # a tiny config on whatever device there is (CI)

For each model (the paper's block at B/16, 224 px, and vit22b-1B/14, 224 px) it times, on
the GPU each framework sees:
  - vitctl-torch forward, bf16 parameters and compute, under inference_mode;
  - vitctl-torch train step: bf16 compute on fp32 parameters, cross-entropy, AdamW (fused);
  - vitctl-train-torch: the step `vitctl train --backend torch --dtype bfloat16` runs
    (vitctl.train.torch_step.train_step: bf16 compute on fp32 parameters, clipping,
    torch_optim's AdamW with its weight-decay mask), one process;
  - timm's model of the same configuration (`timm_spec`), same forward, when timm imports;
  - vitctl-jax forward (jit, bf16 compute) and the train step `vitctl train` runs
    (vitctl.train.step.Setup: AdamW, clipping; bf16 compute, fp32 parameters, donated state).
MFU = FLOPs (vitctl.bench.flops: 2 x every matmul's multiply-adds; a train step 3x the
forward) / seconds / the chip's dense bf16 peak (H200: 790 TFLOP/s;
override with --peak-tflops). Each timing is the best of --reps calls after --warmup calls,
synchronised (torch.cuda.synchronize / block_until_ready). A wall-clock budget (--budget-s,
default 270 s) skips what would not fit, and says so. Prints one table, and one JSON object
with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitctl import bench
from vitctl.bench.models import vitctl_train_step
from vitctl.config import ViTConfig

PEAKS_TFLOPS = {"H200": 790.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
MODELS = {"B/16": ("vit22b-B/16", 256), "1B/14": ("vit22b-1B/14", 64)}  # preset, batch


def best_seconds(call, sync, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        call()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def torch_rows(cfg, batch, args, out):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=dev, dtype=torch.bfloat16)
    y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
    bf16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    model = bench.vitctl_torch_model(bf16).to(dev).eval()

    def fwd(m):
        def call():
            with torch.inference_mode():
                m(x)

        return call

    out.append(("forward", "vitctl-torch", batch, best_seconds(fwd(model), sync, args.warmup, args.reps), bench.flops(cfg, batch)))
    del model
    if bench.timm_available():
        timm_m = bench.timm_model(cfg, "bfloat16").to(dev).eval()
        out.append(("forward", "timm", batch, best_seconds(fwd(timm_m), sync, args.warmup, args.reps), bench.flops(cfg, batch)))
        del timm_m
    train = bench.vitctl_torch_model(dataclasses.replace(cfg, dtype="bfloat16")).to(dev).train()
    opt = torch.optim.AdamW(train.parameters(), lr=1e-4, fused=dev == "cuda")

    def step():
        loss = torch.nn.functional.cross_entropy(train(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out.append(("train", "vitctl-torch", batch, best_seconds(step, sync, args.warmup, args.reps), bench.flops(cfg, batch, train=True)))
    ours = vitctl_train_step(dataclasses.replace(cfg, dtype="bfloat16"), batch, dev)
    out.append(
        ("train", "vitctl-train-torch", batch, best_seconds(ours, sync, args.warmup, args.reps), bench.flops(cfg, batch, train=True))
    )
    if dev == "cuda":
        torch.cuda.empty_cache()


def jax_rows(cfg, batch, args, out):
    import jax

    sync = lambda: None  # the calls below block until ready
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    call, _ = bench.jax_forward(bf16, batch)
    out.append(("forward", "vitctl-jax", batch, best_seconds(call, sync, args.warmup, args.reps), bench.flops(cfg, batch)))
    del call
    step, _ = bench.jax_train_step(bf16, batch)
    out.append(("train", "vitctl-jax", batch, best_seconds(step, sync, args.warmup, args.reps), bench.flops(cfg, batch, train=True)))
    del step
    jax.clear_caches()


def devices() -> dict[str, str]:
    found = {}
    try:
        import torch

        found["torch"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        pass
    try:
        import jax

        found["jax"] = jax.devices()[0].device_kind
    except ImportError:
        pass
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the chip (default: by its name; H200 790)")
    p.add_argument("--models", default="B/16,1B/14", help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=270.0, help="skip what starts after this many seconds")
    p.add_argument("--smoke", action="store_true", help="a tiny config, batch 2, on any device (checks the script runs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    found = devices()
    name = found.get("torch", found.get("jax", "cpu"))
    peak = args.peak_tflops or next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)
    if args.smoke:
        cfg = dataclasses.replace(ViTConfig.from_variant("vit22b-mu/16"), image_size=32, num_classes=10)
        models = {"mu/16 smoke": (cfg, 2)}
        args.warmup, args.reps = 1, 1
    else:
        if "cpu" in name.lower() and not args.peak_tflops:
            print(f"no GPU found ({found}); this check is for an NVIDIA GPU (use --smoke to test the script)", file=sys.stderr)
            return 2
        models = {k: (ViTConfig.from_variant(MODELS[k][0]), MODELS[k][1]) for k in args.models.split(",")}

    t0, rows, skipped = time.perf_counter(), [], []
    for label, (cfg, batch) in models.items():
        for framework, fn in (("torch", torch_rows), ("jax", jax_rows)):
            if time.perf_counter() - t0 > args.budget_s:
                skipped.append(f"{label} {framework}")
                continue
            got: list = []
            try:
                fn(cfg, batch, args, got)
            except Exception as e:  # noqa: BLE001  (report what failed, run the rest)
                skipped.append(f"{label} {framework}: {type(e).__name__}: {str(e)[:200]}")
            rows += [(label, *r) for r in got]

    result = {"devices": found, "peak_tflops": peak, "seconds": round(time.perf_counter() - t0, 1), "skipped": skipped, "rows": []}
    for label, what, who, batch, s, flop in rows:
        tflops = flop / s / 1e12
        result["rows"].append(
            {"model": label, "what": what, "impl": who, "batch": batch, "seconds": s, "images_per_s": batch / s,
             "tflops": tflops, "mfu": tflops / peak if peak else None}
        )  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    bench.print_table(
        f"bf16 on {name} (peak {peak or '?'} TFLOP/s dense bf16), {result['seconds']} s",
        ["model", "step", "impl", "batch", "images/s", "TFLOP/s", "MFU"],
        [
            (r["model"], r["what"], r["impl"], str(r["batch"]), f"{r['images_per_s']:.1f}", f"{r['tflops']:.1f}",
             f"{r['mfu']:.1%}" if r["mfu"] is not None else "-")
            for r in result["rows"]
        ],
    )  # fmt: skip
    for s in skipped:
        print(f"skipped: {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
