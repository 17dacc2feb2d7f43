"""`vitctl demo`: the whole path on a small model, each step through the library the
commands use. Today: init (JAX) -> convert jax-to-torch -> verify; training on digits
and probing join as `vitctl train` and `vitctl probe` land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitctl.cli._options import ForceOpt, err, out

commands = typer.Typer()

DEMO_MODEL = "vit22b-mu/16"  # the paper's block, test-sized (D=32, L=1, N=2), at 32 px
EXAMPLES = """Examples:

  vitctl demo

  vitctl demo --out /tmp/vitctl-demo --force
"""


@commands.command(epilog=EXAMPLES)
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for the demo's checkpoints.")] = Path("runs/demo"),
    force: ForceOpt = False,
) -> None:
    """Run the whole vitctl path on a small model: init, convert to PyTorch, verify parity."""
    import dataclasses

    from vitctl import checkpoint as ckpt
    from vitctl.cli.verify import show
    from vitctl.config import ViTConfig
    from vitctl.convert.convert import convert
    from vitctl.model_jax.model import flat_params, init_model
    from vitctl.verify import verify

    cfg = dataclasses.replace(ViTConfig.from_variant(DEMO_MODEL), image_size=32, num_classes=10, head_zero_init=False)
    jax_dir, torch_dir = out_dir / "jax", out_dir / "torch"
    with ckpt.atomic_output(out_dir, force) as tmp:
        err.print(f"[1/3] init {DEMO_MODEL} at 32 px (JAX, seed 0) -> {jax_dir}")
        (tmp / "jax").mkdir()
        ckpt.save_jax(tmp / "jax", flat_params(init_model(cfg, seed=0)))
        ckpt.write_config(tmp / "jax", cfg, {"source_format": "init", "source": DEMO_MODEL, "created_by": "vitctl demo", "seed": 0})
        err.print(f"[2/3] convert jax-to-torch -> {torch_dir}")
        convert(tmp / "jax", tmp / "torch", "jax-to-torch")
        ckpt.write_json(tmp / ckpt.RUN_MARKER, {"created_by": "vitctl demo", "model": cfg.to_dict()})
    err.print(f"[3/3] verify {jax_dir} {torch_dir}")
    report = verify(jax_dir, torch_dir)
    ckpt.write_json(out_dir / "verify.json", report)
    show(report)
    out.print(f"checkpoints and verify.json in {out_dir}")
    raise typer.Exit(0 if report["passed"] else 1)
