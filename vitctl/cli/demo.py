"""`vitctl demo`: the whole path on a small model of the paper's block, each step through
the library the commands use.

Steps (a list, so more join by appending):
  BUILD, inside one atomic output directory (all or nothing):
    train    vitctl.train.loop.train on scikit-learn's digits -> OUT/jax (a checkpoint dir)
    convert  jax-to-torch -> OUT/torch
  CHECK, on the finished directory (each may fail the demo, exit 1):
    verify   both checkpoints on the same inputs, layer by layer -> OUT/verify.json
    probe    linear probe and few-shot accuracy of the trained model's frozen features on
             digits, on the PyTorch side (the converted checkpoint) -> OUT/probe.json
    push     only with --endpoint: `vitctl hub push OUT/torch REPO` (model card with the
             verify report) to that Hub, and a check of the remote hashes
OUT/demo.json holds every step's summary.

Recipe (measured, see README): the preset vit22b-demo/4 (D=64, L=4, F=256, 4 heads,
patch 4 at 16 px: digits are 8x8, upsampled), AdamW, batch 64, lr 3e-3, 30 warmup steps
then cosine, 300 steps: about 97% test accuracy. `--steps N` trains a shorter run of the
same model (tests). The same model and settings are `vitctl train`'s defaults.

Arguments are checked before any work: --endpoint must be an http(s) URL and comes with
--repo-id ORG/NAME (a Hub repo id), so a push that cannot happen fails at once, not
after the whole run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from vitctl.cli._options import ForceOpt, JsonOpt, err, out, print_json
from vitctl.untrusted import sigterm_as_interrupt

commands = typer.Typer()

MODEL = "vit22b-demo/4"  # the paper's block (parallel, QK-norm, no QKV/norm biases) at D=64, L=4, F=256, N=4, patch 4
STEPS = 300  # the full recipe
TRAIN = {"model": MODEL, "data": "digits", "steps": STEPS, "batch_size": 64, "lr": 3e-3, "warmup": 30, "schedule": "cosine",
         "stats_every": 25, "eval_every": 25, "seed": 0}  # fmt: skip
TARGET_ACCURACY = 0.90
EXAMPLES = """Examples:

  vitctl demo

  vitctl demo --out /tmp/vitctl-demo --force

  vitctl demo --steps 20 --json

  vitctl demo --endpoint http://127.0.0.1:8080 --repo-id me/vitctl-demo
"""


@dataclasses.dataclass
class Run:
    """What the steps share. `root` is where they write: a temporary sibling of `out`
    while BUILD runs, then `out` itself."""

    out: Path
    root: Path
    steps: int
    endpoint: str | None = None
    repo_id: str | None = None
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    failed: list[str] = dataclasses.field(default_factory=list)


def model_config():
    from vitctl.config import ViTConfig

    return ViTConfig.from_variant(MODEL)


def step_train(run: Run) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vitctl.train.loop import train
    from vitctl.train.settings import TrainConfig

    short = {"warmup": min(TRAIN["warmup"], run.steps // 10), "stats_every": min(TRAIN["stats_every"], max(1, run.steps // 3))}
    tcfg = TrainConfig(**{**TRAIN, "steps": run.steps, **short})
    progress = Progress(TextColumn("  step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[info]}"), console=err)
    with progress:
        task = progress.add_task("train", total=tcfg.steps, info="compiling")
        on_log = lambda rec: progress.update(task, completed=rec["step"], info=f"loss {rec['loss']:.4f}")
        r = train(tcfg, run.root / "jax", on_log=on_log)
    if r.get("interrupted"):  # train stopped at a signal and saved: the demo is not built, so nothing is kept
        raise KeyboardInterrupt
    run.results["train"] = {k: r[k] for k in ("steps", "final_loss", "test_accuracy", "images_per_s")}
    run.results["train"]["loop_seconds"] = r["seconds"]  # the steps after the first (compiling) one
    err.print(f"  test accuracy {r['test_accuracy']:.2%} after {r['steps']} steps", markup=False)


def step_convert(run: Run) -> None:
    from vitctl.convert.convert import convert

    convert(run.root / "jax", run.root / "torch", "jax-to-torch")
    run.results["convert"] = {"src": str(run.out / "jax"), "dst": str(run.out / "torch")}


def step_verify(run: Run) -> None:
    from vitctl import checkpoint as ckpt
    from vitctl.verify import verify

    report = verify(run.root / "jax", run.root / "torch")
    ckpt.write_json(run.root / "verify.json", report)
    run.results["verify"] = {"passed": report["passed"], "max_abs": report["max_abs"], "report": str(run.root / "verify.json")}
    if not report["passed"]:
        run.failed.append("verify")


def step_probe(run: Run) -> None:
    from vitctl import checkpoint as ckpt
    from vitctl.cli._reports import probe_with_progress as run_probe

    r = run_probe(run.root / "torch", TRAIN["data"], backend="torch", use_cache=False)
    ckpt.write_json(run.root / "probe.json", r)
    run.results["probe"] = {"linear_accuracy": r["linear"]["accuracy"], "fewshot": {k: v["accuracy"] for k, v in r["fewshot"].items()}}


def step_push(run: Run) -> None:
    from vitctl.hub import push

    r = push(run.root / "torch", run.repo_id, endpoint=run.endpoint, message="vitctl demo")
    run.results["push"] = {k: r[k] for k in ("repo_id", "commit", "url") if k in r}


# (name, what it does, function). BUILD writes the directory; CHECK reads the finished one.
Step = tuple[str, str, Callable[[Run], None]]
BUILD: list[Step] = [
    ("train", "train on digits (JAX) -> jax/", step_train),
    ("convert", "convert jax-to-torch -> torch/", step_convert),
]
CHECK: list[Step] = [
    ("verify", "verify jax/ against torch/ -> verify.json", step_verify),
    ("probe", "linear probe and few-shot on digits, torch/ backend -> probe.json", step_probe),
]
PUSH: Step = ("push", "hub push torch/ (with its model card) -> --endpoint", step_push)


def do(run: Run, step: Step, i: int, n: int) -> None:
    name, what, fn = step
    err.print(f"[{i}/{n}] {name}: {what}", markup=False)
    t = time.perf_counter()
    fn(run)
    run.results.setdefault(name, {})["seconds"] = round(time.perf_counter() - t, 1)


@commands.command(epilog=EXAMPLES)
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory for the demo's checkpoints and reports.")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps (fewer than the recipe's for a quick check).")] = STEPS,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="A Hub to push the PyTorch checkpoint to (skipped when not given).", show_default=False)
    ] = None,
    repo_id: Annotated[
        str | None, typer.Option("--repo-id", help="Hub repository ORG/NAME to push to (with --endpoint).", show_default=False)
    ] = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train a small ViT-22B-style model on digits, convert it to PyTorch, verify parity, probe its features."""
    from vitctl import checkpoint as ckpt

    check_push_arguments(endpoint, repo_id)
    t0 = time.perf_counter()
    run = Run(out=out_dir, root=out_dir, steps=steps, endpoint=endpoint, repo_id=repo_id)
    check = CHECK + ([PUSH] if endpoint else [])
    n = len(BUILD) + len(check)
    m = model_config()
    err.print(
        f"model: {MODEL}, the paper's block, D={m.width} L={m.depth} F={m.mlp_dim} heads={m.num_heads}, patch {m.patch_size} at {m.image_size} px"
    )
    with sigterm_as_interrupt():  # SIGTERM cleans up as Ctrl-C does
        with ckpt.atomic_output(out_dir, force) as tmp:
            run.root = tmp
            for i, step in enumerate(BUILD, 1):
                do(run, step, i, n)
            ckpt.write_json(tmp / ckpt.RUN_MARKER, {"created_by": "vitctl demo", "model": m.to_dict()})
        run.root = out_dir
        try:
            for i, step in enumerate(check, len(BUILD) + 1):
                do(run, step, i, n)
            seconds = round(time.perf_counter() - t0, 1)
            summary = {"out": str(out_dir), "passed": not run.failed, "failed": run.failed, "seconds": seconds, "steps": run.results}
            ckpt.write_json(out_dir / "demo.json", summary)
        except KeyboardInterrupt:
            from vitctl.cli import Interrupted

            raise Interrupted(f"{out_dir} holds the built checkpoints; the checks did not finish: rerun with --force") from None
    if json:
        print_json(summary)
    else:
        show(run, seconds)
    raise typer.Exit(1 if run.failed else 0)


def check_push_arguments(endpoint: str | None, repo_id: str | None) -> None:
    """--endpoint and --repo-id, checked before any work (a push refused after the whole run wastes it)."""
    from vitctl.errors import ConfigError
    from vitctl.hub import check_endpoint, parse_repo

    if endpoint is None:
        if repo_id is not None:
            raise ConfigError("--repo-id is used only with --endpoint (without one the demo pushes nowhere)",
                              hint="add --endpoint URL, or drop --repo-id")  # fmt: skip
        return
    check_endpoint(endpoint)
    if repo_id is None:
        raise ConfigError("--endpoint needs --repo-id: the Hub repository to push to",
                          hint="add --repo-id ORG/NAME, e.g. --repo-id your-name/vitctl-demo")  # fmt: skip
    if parse_repo(repo_id)[1] is not None:  # parse_repo refuses anything but ORG/NAME[@REVISION]
        raise ConfigError(f"--repo-id takes ORG/NAME without @revision, got {repo_id!r}", hint="e.g. --repo-id your-name/vitctl-demo")


def show(run: Run, total: float) -> None:
    from vitctl.cli._reports import show_verify

    r = run.results
    if "verify" in r:
        import json as jsonlib

        show_verify(jsonlib.loads(Path(r["verify"]["report"]).read_text()))
    t = r["train"]
    acc = t["test_accuracy"]
    note = "" if acc >= TARGET_ACCURACY or run.steps < STEPS else f" (below the {TARGET_ACCURACY:.0%} the full recipe reaches)"
    out.print(f"train:   {t['steps']} steps, test accuracy {acc:.2%} on held-out digits{note} ({t['seconds']:.0f} s)", markup=False)
    out.print(f"convert: jax-to-torch -> {r['convert']['dst']} ({r['convert']['seconds']:.0f} s)", markup=False)
    if "verify" in r:
        v = r["verify"]
        diff = f", logits max-abs {v['max_abs']:.3g}" if v["max_abs"] is not None else ""
        out.print(f"verify:  {'PASSED' if v['passed'] else 'FAILED'}{diff} ({v['seconds']:.0f} s)", markup=False)
    if "probe" in r:
        p = r["probe"]
        shots = ", ".join(f"{k}-shot {v:.2%}" for k, v in p["fewshot"].items())
        out.print(f"probe:   linear {p['linear_accuracy']:.2%}; {shots} ({p['seconds']:.0f} s)", markup=False)
    if "push" in r:
        out.print(f"push:    {r['push'].get('repo_id')} @ {r['push'].get('commit', '?')} ({r['push']['seconds']:.0f} s)", markup=False)
    out.print(
        f"{run.out}: jax/ (with metrics.jsonl, metrics.png), torch/, verify.json, probe.json, demo.json ({total:.0f} s)", markup=False
    )
