"""How long `vitctl verify` takes on a B/16-size pair, against one forward pass of each model.

Target: verify <= 2.5x (JAX forward + torch forward) on the same batch, all
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
from vitctl.config import ViTConfig
from vitctl.convert.convert import convert
from vitctl.formats import layout
from vitctl.params import random_weights
from vitctl.verify import run_config, run_side, set_precision, verify


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def row(name: str, value: float, baseline: float | None = None, unit: str = "") -> dict:
    """A result row; ratio = value / baseline where a baseline is given."""
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": None if baseline is None else value / baseline}


def measure(cfg: ViTConfig, batch: int) -> tuple[dict, dict, dict]:
    """Writes a random checkpoint with fp32 and bf16 torch copies, times one forward of each
    model as verify runs them, then verify itself; returns (seconds by step, fp32 report, bf16 report)."""
    from vitctl.data import preprocess
    from vitctl.params import unstack
    from vitctl.verify import Side

    with tempfile.TemporaryDirectory() as tmp:
        jax_dir, torch_dir, bf16_dir = Path(tmp) / "jax", Path(tmp) / "torch", Path(tmp) / "bf16"
        jax_dir.mkdir()
        ckpt.write_config(jax_dir, cfg, {"created_by": "bench/verify.py"})
        params = random_weights(cfg)
        layout.save_jax(jax_dir, params)
        convert(jax_dir, torch_dir, "jax-to-torch")
        convert(jax_dir, bf16_dir, "jax-to-torch", dtype="bfloat16")

        set_precision("fp32")
        images = preprocess.random_images(batch, cfg.image_size, cfg.channels, 0)
        hub, run_cfg = dict(unstack(params, cfg.depth)), run_config(cfg, "fp32")
        jax_side, torch_side = Side("A", jax_dir, "vitctl-jax", cfg), Side("B", torch_dir, "vitctl-torch", cfg)
        t = {"jax_first": timed(lambda: run_side(jax_side, run_cfg, hub, images))}
        t["jax_warm"] = timed(lambda: run_side(jax_side, run_cfg, hub, images), 2)
        t["torch"] = timed(lambda: run_side(torch_side, run_cfg, hub, images), 2)

        t0 = time.perf_counter()
        r = verify(jax_dir, torch_dir, batch=batch)
        t["verify"] = time.perf_counter() - t0
        assert r["passed"], r["layers"]
        r16 = verify(jax_dir, bf16_dir, batch=batch, precision="bf16")
    return t, r, r16


def report_rows(model: str, batch: int, t: dict, r: dict, r16: dict) -> list[dict]:
    worst = max((x for x in r16["layers"] if x["name"] not in ("logits", "pre_logits")), key=lambda x: x["max_rel"])
    return [
        row(f"verify {model} fp32, batch {batch}", t["verify"], t["jax_first"] + t["torch"], "s"),
        row("  one JAX forward (jit compile included)", t["jax_first"], unit="s"),
        row("  one JAX forward (warm)", t["jax_warm"], unit="s"),
        row("  one torch forward (warm)", t["torch"], unit="s"),
        row("verify vs warm forwards", t["verify"], t["jax_warm"] + t["torch"], "s"),
        row("fp32 pair: logits max-abs", r["max_abs"], r["tolerance"]),
        row(f"bf16 copy in bf16: worst relative RMS error ({r16['rel_rms_layer']})", r16["rel_rms"], r16["rel_tol"]),
        row(f"bf16 copy in bf16: worst max-rel ({worst['name']}; shown, not judged)", worst["max_rel"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit22b-B/16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = report_rows(args.model, args.batch, *measure(ViTConfig.from_variant(args.model, head_zero_init=False), args.batch))
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return
    print(f"{'measure':52s} {'value':>10s} {'baseline':>10s} {'ratio':>7s}")
    for r in rows:
        base_s = f"{r['baseline']:.3g}" if r["baseline"] is not None else ""
        ratio_s = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        print(f"{r['name']:52s} {r['value']:10.3g} {base_s:>10s} {ratio_s:>7s}")
    print("target: verify <= 2.5x (JAX forward incl. compile + torch forward); bf16 ratios < 1 pass the preset")


if __name__ == "__main__":
    main()
