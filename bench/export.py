"""Exported graphs against the model they came from: images/s of onnxruntime (vitctl export
--format onnx) and of the torch.export program (--format torch-export) beside vitctl-torch under
torch.inference_mode, the same weights, inputs and batch sizes.

    python bench/export.py [--size vit22b-Ti/16] [--batches 1,32] [--iters 3] [--max-wait 30] [--json] [--tiny] [--workdir DIR]

A random-weight vitctl-jax checkpoint of --size (1000 classes, 224 px, fp32) is written to a
temporary directory and exported in both formats by vitctl.infer.export (the export's seconds are
rows too). Per batch size, the three run float32 NCHW images: vitctl-torch (the PyTorch twin,
vitctl.infer.runner.torch_model), onnxruntime (CPUExecutionProvider, its default thread count)
and the loaded program (torch.export.load(...).module()). Timing: one warm-up call each, then
--iters rounds calling them in turn behind a quiet gate (vitctl.bench.QuietGate); a result is
the best round, as images/s against vitctl-torch's (ratio > 1: faster than the twin).

The machine is shared (2 cores here): read the load line at the end; nothing asserts on time.
--tiny: a 2-layer width-32 model at 16 px, batches 1 and 4, one round, no waiting (the tests; its
figures mean nothing). --json prints one JSON object {"rows": [...], ...} (bench/forward.py's
schema) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vitctl import bench as B
from vitctl.config import ViTConfig

IMPLS = ("vitctl-torch", "onnxruntime", "torch.export")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config(size: str, tiny: bool) -> ViTConfig:
    if tiny:
        return ViTConfig.from_variant(
            "vit22b-mu/16", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, num_classes=10
        )
    return ViTConfig.from_variant(size, num_classes=1000)


def write_checkpoint(path: Path, cfg: ViTConfig) -> Path:
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout
    from vitctl.params import random_weights

    path.mkdir()
    ckpt.write_config(path, cfg, {"source_format": "bench", "source": "random_weights", "seed": 0})
    layout.save_jax(path, random_weights(cfg, 0))
    return path


def runners(ckpt: Path, onnx_path: Path, pt2_path: Path) -> dict:
    """Each implementation as a function: float32 [B, C, S, S] numpy -> float32 logits numpy."""
    import onnxruntime as ort
    import torch

    from vitctl.infer.runner import torch_model
    from vitctl.open import open_checkpoint

    with open_checkpoint(ckpt) as ck:
        twin = torch_model(ck)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(pt2_path)).module()

    def run_twin(x):
        with torch.inference_mode():
            return twin(torch.from_numpy(x))[0].numpy()

    def run_program(x):
        with torch.inference_mode():
            return program(torch.from_numpy(x))[0].numpy()

    return {"vitctl-torch": run_twin, "onnxruntime": lambda x: session.run(["logits"], {"images": x})[0], "torch.export": run_program}


def export_rows(cfg: ViTConfig, label: str, workdir: Path) -> tuple[list[B.Row], Path, Path, Path]:
    from vitctl.infer.export import export

    ckpt = write_checkpoint(workdir / "ckpt", cfg)
    rows, paths = [], {}
    for fmt, name in (("onnx", "vit.onnx"), ("torch-export", "vit.pt2")):
        log(f"exporting {label} as {fmt} ...")
        t0 = time.perf_counter()
        report = export(ckpt, workdir / name, fmt=fmt)
        rows.append(B.Row(f"export {label} {fmt}", time.perf_counter() - t0, "s", note=f"{report['bytes'] / 2**20:.1f} MiB"))
        paths[fmt] = workdir / name
    return rows, ckpt, paths["onnx"], paths["torch-export"]


def forward_rows(fns: dict, cfg: ViTConfig, label: str, batches: list[int], iters: int, gate) -> list[B.Row]:
    rows = []
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, cfg.channels, cfg.image_size, cfg.image_size)).astype(np.float32)
        ref = fns["vitctl-torch"](x)
        agree = {name: float(np.abs(fn(x) - ref).max()) for name, fn in fns.items()}  # same function, or the rates mean nothing
        log(f"timing batch {b} ({', '.join(IMPLS)}), {iters} round(s) ...")
        times = B.interleaved_times({name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()}, warmup=1, iters=iters, gate=gate)
        base = f"forward {label} fp32 b{b} vitctl-torch"
        for name in IMPLS:
            note = f"logits max-abs vs vitctl-torch {agree[name]:.1e}"
            rows.append(
                B.Row(f"forward {label} fp32 b{b} {name}", b / min(times[name]), "images/s", None if name == IMPLS[0] else base, note=note)
            )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="vit22b-Ti/16", help="a preset from `vitctl models` (224 px)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (the best counts)")
    p.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait in all for a quiet machine")
    p.add_argument("--workdir", default=None, help="where the temporary checkpoint and graphs go")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny model, batches 1 and 4, one round (the tests)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config(args.size, args.tiny)
    label = "tiny" if args.tiny else args.size
    batches = [1, 4] if args.tiny else [int(b) for b in args.batches.split(",") if b]
    iters, gate = (1, B.QuietGate(0)) if args.tiny else (args.iters, B.QuietGate(args.max_wait))
    monitor = B.LoadMonitor()
    with tempfile.TemporaryDirectory(prefix="vitctl-bench-export-", dir=args.workdir) as tmp:
        rows, ckpt, onnx_path, pt2_path = export_rows(cfg, label, Path(tmp))
        rows += forward_rows(runners(ckpt, onnx_path, pt2_path), cfg, label, batches, iters, gate)
    rows = B.link(rows)
    report = {"rows": [r.as_dict() for r in rows], "machine": B.machine(), "load": {**monitor.summary(), "quiet_gate": gate.summary()}}
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console

    console = Console(width=200, highlight=False)
    console.print(B.rows_table(f"bench/export.py: {report['machine']['cpu']}", rows))
    console.print(f"load: {monitor.describe()}; {gate.describe()}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
