"""How long `vitctl verify` takes on a B/16-size pair, against one forward pass of each model.

Target (issue 4): verify <= 2.5x (JAX forward + torch forward) on the same batch, all
measured in this run. The JAX forward is timed as `verify` meets it (jit compile
included, since verify compiles once per run) and warm; torch's forward is timed warm.
Also measures what the bf16 preset has to absorb: a bf16 copy of the checkpoint
against its fp32 original, both computed in bf16.

    python bench/verify.py [--model vit22b-B/16] [--batch 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vitctl import checkpoint as ckpt
from vitctl.convert.mapping import random_weights
from vitctl.config import ViTConfig
from vitctl.convert.convert import convert
from vitctl.verify import run_config, run_side, set_precision, verify


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit22b-B/16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = ViTConfig.from_variant(args.model, head_zero_init=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jax_dir, torch_dir, bf16_dir = Path(tmp) / "jax", Path(tmp) / "torch", Path(tmp) / "bf16"
        jax_dir.mkdir()
        ckpt.write_config(jax_dir, cfg, {"created_by": "bench/verify.py"})
        params = random_weights(cfg)
        ckpt.save_jax(jax_dir, params)
        convert(jax_dir, torch_dir, "jax-to-torch")
        convert(jax_dir, bf16_dir, "jax-to-torch", dtype="bfloat16")

        # One forward of each model on the same batch, as verify runs them.
        from vitctl import preprocess
        from vitctl.convert.mapping import unstack
        from vitctl.verify import Side

        set_precision("fp32")
        images = preprocess.random_images(args.batch, cfg.image_size, cfg.channels, 0)
        hub = dict(unstack(params, cfg.depth))
        run_cfg = run_config(cfg, "fp32")
        jax_side, torch_side = Side("A", jax_dir, "vitctl-jax", cfg), Side("B", torch_dir, "vitctl-torch", cfg)
        t_jax_first = timed(lambda: run_side(jax_side, run_cfg, hub, images))
        t_jax_warm = timed(lambda: run_side(jax_side, run_cfg, hub, images), 2)
        t_torch = timed(lambda: run_side(torch_side, run_cfg, hub, images), 2)

        t = time.perf_counter()
        r = verify(jax_dir, torch_dir, batch=args.batch)
        t_verify = time.perf_counter() - t
        assert r["passed"], r["layers"]
        r16 = verify(jax_dir, bf16_dir, batch=args.batch, precision="bf16")

    base = t_jax_first + t_torch
    rows += [
        {
            "name": f"verify {args.model} fp32, batch {args.batch}",
            "value": t_verify,
            "unit": "s",
            "baseline": base,
            "ratio": t_verify / base,
        },
        {"name": "  one JAX forward (jit compile included)", "value": t_jax_first, "unit": "s", "baseline": None, "ratio": None},
        {"name": "  one JAX forward (warm)", "value": t_jax_warm, "unit": "s", "baseline": None, "ratio": None},
        {"name": "  one torch forward (warm)", "value": t_torch, "unit": "s", "baseline": None, "ratio": None},
        {
            "name": "verify vs warm forwards",
            "value": t_verify,
            "unit": "s",
            "baseline": t_jax_warm + t_torch,
            "ratio": t_verify / (t_jax_warm + t_torch),
        },
        {
            "name": "fp32 pair: logits max-abs",
            "value": r["max_abs"],
            "unit": "",
            "baseline": r["tolerance"],
            "ratio": r["max_abs"] / r["tolerance"],
        },
        {
            "name": f"bf16 copy in bf16: worst relative RMS error ({r16['rel_rms_layer']})",
            "value": r16["rel_rms"],
            "unit": "",
            "baseline": r16["rel_tol"],
            "ratio": r16["rel_rms"] / r16["rel_tol"],
        },
    ]
    worst = max((x for x in r16["layers"] if x["name"] not in ("logits", "pre_logits")), key=lambda x: x["max_rel"])
    rows.append(
        {
            "name": f"bf16 copy in bf16: worst max-rel ({worst['name']}; shown, not judged)",
            "value": worst["max_rel"],
            "unit": "",
            "baseline": None,
            "ratio": None,
        }
    )
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return
    print(f"{'measure':52s} {'value':>10s} {'baseline':>10s} {'ratio':>7s}")
    for row in rows:
        base_s = f"{row['baseline']:.3g}" if row["baseline"] is not None else ""
        ratio_s = f"{row['ratio']:.2f}" if row["ratio"] is not None else ""
        print(f"{row['name']:52s} {row['value']:10.3g} {base_s:>10s} {ratio_s:>7s}")
    print("target: verify <= 2.5x (JAX forward incl. compile + torch forward); bf16 ratios < 1 pass the preset")


if __name__ == "__main__":
    main()
