"""Where `vitctl verify --precision bf16` must put its bar: bf16 round-off against real bugs.

For each model (random init, or trained weights from a vitctl-jax checkpoint), side A is
the JAX model and side B the PyTorch model, both computing in bfloat16, on verify's own
seeded input batch. B runs:
  - roundoff fp32 weights: the same fp32 weights (`verify A B --precision bf16` on a plain conversion)
  - roundoff bf16 weights: the weights rounded to bfloat16 (a `convert --dtype bfloat16` conversion)
  - bug <flip>:            the fp32 weights with one convention flipped (vitctl.verify.flips:
                           GELU form, norm epsilon, norm kind, softmax dtype, QKV head layout)
Per row: the worst activation's rel_rms (||B - A|| / ||A||) and where, logits rel_rms,
pre-logits and logits max-abs (the old bar's measure), the lowest cosine, top-1 agreement,
and the verdict under PRESETS["bf16"]. A row for the same flip applied to side A as well
(`noop`) gives the spread of a flip that changes nothing: what diagnose must not call a fix.

    python bench/verify_bf16.py --model vit22b-mu/16 --model Ti/16,depth=48 --trained /tmp/demo/jax --batch 8 [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import ml_dtypes

from vitctl.config import ViTConfig
from vitctl.data import preprocess
from vitctl.formats import layout
from vitctl.params import random_weights, unstack
from vitctl.verify import PRESETS, Side, compare_outputs, flips, run_config, run_side, set_precision


def summary(r: dict) -> dict:
    layers = {x["name"]: x for x in r["layers"]}
    worst = max(r["layers"], key=lambda x: x["rel_rms"])
    return {
        "worst_rel_rms": worst["rel_rms"], "worst_layer": worst["name"], "logits_rel_rms": layers["logits"]["rel_rms"],
        "pre_logits_max_abs": layers["pre_logits"]["max_abs"], "logits_max_abs": layers["logits"]["max_abs"],
        "pre_logits_scale": layers["pre_logits"]["max_abs"] / max(layers["pre_logits"]["max_rel"], 1e-30),
        "min_cosine": min(x["cosine"] for x in r["layers"]), "top1": r["top1"], "passed": r["first_divergent"] is None,
    }  # fmt: skip


def measure(name: str, cfg: ViTConfig, params: dict, batch: int) -> list[dict]:
    """params: per-layer JAX names, float32."""
    images = preprocess.random_images(batch, cfg.image_size, cfg.channels, 0)
    jax_side, torch_side = Side("A", Path("."), "vitctl-jax", cfg), Side("B", Path("."), "vitctl-torch", cfg)
    tol = PRESETS["bf16"]
    out_a = run_side(jax_side, run_config(cfg, "bf16"), params, images)
    rows = []

    def row(kind, what, out_b):
        rows.append({"model": name, "kind": kind, "case": what, **summary(compare_outputs(out_a, out_b, tol))})

    row("roundoff", "fp32 weights", run_side(torch_side, run_config(cfg, "bf16"), params, images))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}
    bcfg = dataclasses.replace(cfg, param_dtype="bfloat16")
    row("roundoff", "bf16 weights", run_side(torch_side, run_config(bcfg, "bf16"), bf16, images))
    for what, fcfg, transform in flips(cfg, "bf16"):
        fparams = transform(params) if transform else params
        out_b = run_side(torch_side, run_config(fcfg, "bf16"), fparams, images)
        row("bug", what, out_b)
        # The same flip on both sides: no bug left, the spread of round-off alone under that flip.
        if transform is None:
            flipped_a = run_side(jax_side, run_config(fcfg, "bf16"), fparams, images)
            r = compare_outputs(flipped_a, out_b, tol)
            rows.append({"model": name, "kind": "noop", "case": what, **summary(r)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="a preset, random init, e.g. vit22b-Ti/16,depth=48 (repeatable)")
    ap.add_argument("--trained", action="append", default=[], help="a vitctl-jax checkpoint directory (repeatable)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    set_precision("bf16")
    rows = []
    for spec in args.model:  # "vit22b-Ti/16" or "vit22b-Ti/16,depth=48"
        name, *over = spec.split(",")
        over = {k: int(v) for k, v in (o.split("=") for o in over)}
        cfg = ViTConfig.from_variant(name, head_zero_init=False, **over)  # a zero head makes the logits all 0
        rows += measure(f"{spec} random", cfg, dict(unstack(random_weights(cfg), cfg.depth)), args.batch)
    for path in args.trained:
        cfg = layout.read_checkpoint_config(Path(path))
        params = Side("A", Path(path), layout.JAX, cfg).params()
        rows += measure(f"{Path(path).name} trained (D={cfg.width} L={cfg.depth})", cfg, params, args.batch)
    if args.json:
        print(json.dumps({"rows": rows, "bar": dataclasses.asdict(PRESETS["bf16"])}, indent=2))
        return
    head = f"{'model':34s} {'kind':8s} {'case':44s} {'worst rel_rms':>13s} {'(layer)':>11s} {'logits rel':>10s}"
    print(head + f" {'pre max-abs':>11s} {'pre scale':>9s} {'min cos':>10s} {'top1':>5s} verdict")
    for r in rows:
        print(
            f"{r['model']:34s} {r['kind']:8s} {r['case']:44s} {r['worst_rel_rms']:13.2e} {r['worst_layer']:>11s} "
            f"{r['logits_rel_rms']:10.2e} {r['pre_logits_max_abs']:11.3g} {r['pre_logits_scale']:9.3g} {r['min_cosine']:10.6f} "
            f"{r['top1']:5.0%} {'pass' if r['passed'] else 'FAIL'}"
        )
    print(f"bar: rel_rms <= {PRESETS['bf16'].rel:g} on every activation (bf16 unit round-off 2^-8 = {2**-8:.2e})")


if __name__ == "__main__":
    main()
