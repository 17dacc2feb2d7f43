"""Transfer at CPU scale: fine-tuning a pretrained model against training from scratch.

A small model of the paper's block (vit22b-demo/4: D=64, L=4, F=256, N=4, patch 4) is
pretrained on scikit-learn's digits 0-4 at 16 px (a 4x4 patch grid), then fine-tuned on
the other five digits, 5-9 (labels 0-4, class names "5".."9"), at 24 px (6x6 grid) with a
new zero-initialised head and the learned position embedding resampled 4x4 -> 6x6. The
same model trained from scratch on the same data, for the same steps, seeds and recipe,
is the baseline. Both are compared on the full training split of digits 5-9 and with
few examples per class (k-shot: k training images per class, drawn per seed), where
transfer should help most. Every run goes through `vitctl train`'s own code path
(vitctl.train.loop.train with a TrainConfig, as the CLI builds it); the held-out
accuracy is what the trainer logs every `eval_every` steps in metrics.jsonl. The
equivalent commands:

    vitctl train --model vit22b-demo/4 --data OUT/data/digits0-4 --image-size 16 --out OUT/pretrain
    vitctl train --init-from OUT/pretrain --data OUT/data/digits5-9 --image-size 24 --num-classes 5 --out OUT/ft
    vitctl train --model vit22b-demo/4 --data OUT/data/digits5-9 --image-size 24 --out OUT/scratch

Usage:

    python examples/transfer/run.py                        # the README's runs and plot (~3-4 minutes on 2 cores)
    python examples/transfer/run.py --steps 30 --seeds 0 --out /tmp/transfer
    python examples/transfer/run.py --out runs/transfer --plot-only   # plot again

Data (written to OUT/data/ as ImageFolders, ROOT/{train,test}/<digit>/<n>.png, which
`vitctl train --data` reads with their class names): each class's held-out fifth is fixed
(seed 0), so every run of a task is scored on the same test images; a k-shot set takes k
training images per class with the run's seed. Writes OUT/results.json (setup, one row per run with its
accuracy curve, and the mean per task and start) and OUT/transfer.png (held-out accuracy
vs step, fine-tuned vs scratch, one panel per task).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

MODEL = "vit22b-demo/4"
# The pretraining seed is none of the downstream seeds: a from-scratch run must not start from
# the very initialisation the pretrained weights grew from.
PRETRAIN = {"classes": (0, 1, 2, 3, 4), "image_size": 16, "seed": 100}
FINETUNE = {"classes": (5, 6, 7, 8, 9), "image_size": 24}
# One recipe for both starts, so that the comparison is about the initial weights only.
TRAIN = {"batch_size": 64, "lr": 3e-3, "schedule": "cosine", "weight_decay": 1e-4, "stats_every": 0, "log_every": 1}
TEST_SHARE = 5  # each class's held-out share: one in five


# ----------------------------------------------------------------------------- data
def digits(classes: tuple[int, ...]):
    """scikit-learn's digits of `classes`, as uint8 [N, 8, 8] and labels 0..len(classes)-1."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, classes)
    images = np.round(d.images[keep] * (255.0 / 16.0)).astype(np.uint8)  # counts 0..16, as vitctl's "digits" source scales them
    labels = np.searchsorted(np.asarray(classes), d.target[keep]).astype(np.int32)
    return images, labels


def held_out(labels, seed: int = 0):
    """A boolean mask: one in TEST_SHARE of each class, seeded (the same test images for every run)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: len(idx) // TEST_SHARE]] = True
    return test


def save_folder(root: Path, class_names: list[str], train, test) -> dict[str, Any]:
    """ROOT/{train,test}/<class name>/<n>.png (an ImageFolder: `vitctl train --data ROOT` reads the
    class names from the folder names); returns {"path": ROOT, "n_train": ...}."""
    from PIL import Image

    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (x, y) in (("train", train), ("test", test)):
        for name in class_names:
            (tmp / split / name).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(x, y)):
            Image.fromarray(image).save(tmp / split / class_names[label] / f"{i:04d}.png")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return {"path": root, "n_train": len(train[1])}


def write_data(out: Path, shots: list[int], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """OUT/data/: the pretraining set, the fine-tuning set and its k-shot subsets (one per seed);
    returns {task: {"path", "n_train"}}, tasks "pretrain", "full" and "{k}-shot/{seed}"."""
    import numpy as np

    sets = {}
    for task, spec in (("pretrain", PRETRAIN), ("full", FINETUNE)):
        x, y = digits(spec["classes"])
        test = held_out(y)
        names = [str(c) for c in spec["classes"]]
        sets[task] = save_folder(out / "data" / f"digits{names[0]}-{names[-1]}", names, (x[~test], y[~test]), (x[test], y[test]))
    xt, yt = x[~test], y[~test]
    for k in shots:
        for seed in seeds:
            rng = np.random.default_rng(seed)
            pick = np.concatenate([rng.choice(np.flatnonzero(yt == c), k, replace=False) for c in range(len(names))])
            root = out / "data" / f"digits5-9-{k}shot-seed{seed}"
            sets[f"{k}-shot/{seed}"] = save_folder(root, names, (xt[pick], yt[pick]), (x[test], y[test]))
    return sets


# ----------------------------------------------------------------------------- runs
def run_train(tcfg, run_dir: Path) -> dict[str, Any]:
    """One `vitctl train` run; returns its result and the held-out accuracy curve [(step, accuracy)]."""
    from vitctl.train.loop import train
    from vitctl.train.report import read_metrics

    result = train(tcfg, run_dir, force=True)
    curve = [(r["step"], r["test_accuracy"]) for r in read_metrics(run_dir) if "test_accuracy" in r]
    return {"result": result, "curve": curve}


def pretrain(out: Path, data: dict[str, Any], steps: int, model: dict | None = None) -> dict[str, Any]:
    from vitctl.train.loop import TrainConfig

    tcfg = TrainConfig(model=model_file(out, model), data=str(data["path"]), steps=steps, seed=PRETRAIN["seed"], image_size=PRETRAIN["image_size"],
                       eval_every=max(1, steps // 10), **TRAIN)  # fmt: skip
    return {"task": "pretrain", "start": "scratch", "seed": PRETRAIN["seed"], "steps": steps, **run_train(tcfg, out / "pretrain")}


def model_file(out: Path, model: dict | None) -> str:
    """The preset's name, or (with overrides: the tests' smaller model) a ViTConfig JSON file."""
    if not model:
        return MODEL
    from vitctl.config import ViTConfig

    path = out / "model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ViTConfig.from_variant(MODEL, **model).to_json())
    return str(path)


def downstream(out: Path, task: str, data: dict[str, Any], start: str, seed: int, steps: int, eval_every: int, model: dict | None):
    """One fine-tuning (start "pretrained": --init-from OUT/pretrain) or from-scratch run on the digits 5-9 task `task`."""
    from vitctl.train.loop import TrainConfig

    n_train = data["n_train"]
    common = {**TRAIN, "batch_size": min(TRAIN["batch_size"], n_train)}  # a 10-shot set is one batch of 50
    common.update(data=str(data["path"]), steps=steps, seed=seed, image_size=FINETUNE["image_size"], eval_every=eval_every)
    if start == "pretrained":
        tcfg = TrainConfig(init_from=str(out / "pretrain"), num_classes=len(FINETUNE["classes"]), **common)
    else:
        tcfg = TrainConfig(model=model_file(out, model), **common)
    name = f"{task.replace('/', '-seed')}-{start}" if "/" in task else f"{task}-seed{seed}-{start}"
    row = run_train(tcfg, out / "runs" / name)
    return {"task": task.split("/")[0], "start": start, "seed": seed, "steps": steps, "n_train": n_train, **row}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, start): the mean over seeds of the held-out accuracy at each evaluated step and at the end."""
    table = []
    for task in dict.fromkeys(r["task"] for r in runs if r["task"] != "pretrain"):
        for start in ("pretrained", "scratch"):
            group = [r for r in runs if r["task"] == task and r["start"] == start]
            if not group:
                continue
            steps = [s for s, _ in group[0]["curve"]]
            mean = [statistics.fmean(dict(r["curve"])[s] for r in group) for s in steps]
            finals = [r["curve"][-1][1] for r in group]
            table.append({"task": task, "start": start, "seeds": [r["seed"] for r in group], "n_train": group[0]["n_train"],
                          "steps": steps, "mean_accuracy": mean, "final_accuracy": finals,
                          "mean_final_accuracy": statistics.fmean(finals), "first_eval_accuracy": mean[0]})  # fmt: skip
    return table


def experiment(
    out: str | Path, steps: int, pretrain_steps: int, seeds: list[int], shots: list[int], full: bool = True, model: dict | None = None
) -> dict[str, Any]:
    """Pretrains once, then fine-tunes and trains from scratch per task and seed; writes OUT/results.json.

    model: overrides of the preset (the tests' smaller model); full: also the whole fine-tuning set."""
    out = Path(out)
    paths = write_data(out, shots, seeds)
    runs = [pretrain(out, paths["pretrain"], pretrain_steps, model)]
    eval_every = max(1, steps // 12)
    tasks = (["full"] if full else []) + [f"{k}-shot/{s}" for k in shots for s in seeds]
    for task in tasks:
        for seed in [int(task.split("/")[1])] if "/" in task else seeds:
            for start in ("pretrained", "scratch"):
                runs.append(downstream(out, task, paths[task], start, seed, steps, eval_every, model))
    setup = {"model": MODEL, "model_overrides": model or {}, "pretrain": {**PRETRAIN, "steps": pretrain_steps},
             "finetune": {**FINETUNE, "class_names": [str(c) for c in FINETUNE["classes"]], "steps": steps},
             "train": TRAIN, "seeds": seeds, "shots": shots, "eval_every": eval_every}  # fmt: skip
    results = {
        "setup": setup,
        "pretrain_accuracy": runs[0]["result"]["test_accuracy"],
        "summary": summarize(runs),
        "runs": [{k: v for k, v in r.items() if k != "result"} | {"seconds": r["result"]["seconds"]} for r in runs],
    }
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out / "results.json")
    return results


# ----------------------------------------------------------------------------- plot and table
def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Held-out accuracy vs step, one panel per task: blue fine-tuned, red from scratch; thin
    lines per seed, thick the mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_train = {r["task"]: r["n_train"] for r in results["summary"]}
    tasks = sorted(n_train, key=n_train.get, reverse=True)  # most training images first
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks) + 0.6, 3.3), dpi=80, squeeze=False)
    colors = {"pretrained": "tab:blue", "scratch": "tab:red"}
    labels = {"pretrained": "fine-tuned (pretrained on 0-4, 16 px)", "scratch": "from scratch"}
    for ax, task in zip(axes[0], tasks):
        for run in (r for r in results["runs"] if r["task"] == task):
            ax.plot(*zip(*run["curve"]), color=colors[run["start"]], linewidth=0.6, alpha=0.4)
        for row in (r for r in results["summary"] if r["task"] == task):
            ax.plot(row["steps"], row["mean_accuracy"], color=colors[row["start"]], linewidth=2, label=labels[row["start"]])
        ax.axhline(1 / len(FINETUNE["classes"]), color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set(
            xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02), title=f"digits 5-9 at 24 px, {task} ({n_train[task]} train images)"
        )
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="x-small", loc="lower right")
    pre = results["setup"]["pretrain"]
    fig.suptitle(f"pretrained {pre['steps']} steps on digits 0-4 at 16 px (held-out accuracy {results['pretrain_accuracy']:.3f}); "
                 f"mean of seeds {', '.join(map(str, results['setup']['seeds']))} (thick) and each seed (thin)", fontsize="small")  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def print_table(results: dict[str, Any]) -> None:
    print(f"pretrained on digits 0-4 at 16 px: held-out accuracy {results['pretrain_accuracy']:.3f}")
    print(f"{'task':>8} {'train imgs':>10} {'start':>10} {'first eval':>10} {'final (mean)':>12}  final per seed")
    for r in results["summary"]:
        per_seed = " ".join(f"{a:.3f}" for a in r["final_accuracy"])
        print(
            f"{r['task']:>8} {r['n_train']:>10} {r['start']:>10} {r['first_eval_accuracy']:>10.3f} {r['mean_final_accuracy']:>12.3f}  {per_seed}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="steps of each fine-tuning and from-scratch run")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds of the downstream runs")
    p.add_argument("--shots", default="2,10", help="comma-separated k of the k-shot tasks ('' for none)")
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--plot-only", action="store_true", help="plot the results already in --out")
    args = p.parse_args(argv)
    if args.plot_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
    else:
        seeds, shots = [int(s) for s in args.seeds.split(",")], [int(k) for k in args.shots.split(",") if k]
        results = experiment(args.out, args.steps, args.pretrain_steps, seeds, shots)
    print_table(results)
    png = plot(results, Path(args.out) / "transfer.png")
    print(f"plot: {png}; table: {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
