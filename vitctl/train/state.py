"""Training-state checkpoints under OUT/state/ for exact resume.

    state/00000020/tree/     Orbax (StandardCheckpointer): {"params", "opt", "step"}
    state/00000020/meta.json {"step", "rng", "data": Loader.state(), "mesh", "time"}

Each step directory is written under a temporary name and renamed when complete, so
a run killed at any moment (SIGKILL included) leaves only whole checkpoints; `latest`
ignores anything else. The last `keep` are kept.

Restores go into an abstract target (jax.ShapeDtypeStruct with the *current* mesh's
shardings, from jax.eval_shape), so a state saved on one mesh shape restores onto
another: Orbax reshards on read (shared/DESIGN.md, "Traps already met").
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from vitctl.checkpoint import remove_tree
from vitctl.errors import CheckpointError

STEP_DIR = re.compile(r"^\d{8}$")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def steps(state_dir: str | Path) -> list[int]:
    """The complete checkpoints' steps, ascending."""
    d = Path(state_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file())


def latest(state_dir: str | Path) -> int | None:
    found = steps(state_dir)
    return found[-1] if found else None


def save(state_dir: str | Path, step: int, tree: Any, meta: dict[str, Any], keep: int = 3) -> Path:
    """Writes state_dir/{step:08d} atomically; then deletes all but the newest `keep` (and stale temporaries).

    With several processes every process calls this: each writes the shards it holds
    (Orbax), and process 0 writes meta.json and renames the directory into place once all
    have finished (barriers before and after, so no process runs ahead of the commit).
    A failed write (a full disk, say) leaves the complete checkpoints as they were and
    raises CheckpointError naming the latest one.
    """
    import jax

    from vitctl.train.loop import sync

    d = Path(state_dir).absolute()
    primary = jax.process_index() == 0
    final = d / f"{step:08d}"
    # One name that every process computes alike (a random one would differ between processes).
    tmp = d / f".tmp-{step:08d}"
    if primary:
        d.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir()
    sync(f"vitctl-state-begin-{step}")
    try:
        try:
            with _ocp().StandardCheckpointer() as ckptr:
                ckptr.save(tmp / "tree", tree)
                ckptr.wait_until_finished()
            sync(f"vitctl-state-written-{step}")
            if primary:
                (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
                if final.exists():  # a rerun of the same step: moved aside whole (deleting in place could leave half of it)
                    shutil.rmtree(d / f".tmp-old-{step:08d}", ignore_errors=True)
                    final.rename(d / f".tmp-old-{step:08d}")
                tmp.rename(final)
        except Exception as e:
            last = latest(d)
            raise CheckpointError(
                f"cannot save the training state of step {step} in {d}: {e}",
                hint="check the free disk space and the file size limit (ulimit -f); "
                + (
                    f"the latest complete state, step {last}, is intact: continue from it with --resume"
                    if last is not None
                    else "no complete training state was saved"
                ),
            ) from e
    except BaseException:
        if primary:
            remove_tree(tmp)  # retried: Orbax's threads may still be adding files of the failed save
        raise
    if primary:
        for old in steps(d)[:-keep] if keep > 0 else []:
            shutil.rmtree(d / f"{old:08d}", ignore_errors=True)
        for stale in d.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    sync(f"vitctl-state-done-{step}")
    return final


def restore(state_dir: str | Path, step: int, abstract_tree: Any) -> tuple[Any, dict[str, Any]]:
    """(tree restored into `abstract_tree`'s shapes, dtypes and shardings, meta dict)."""
    path = Path(state_dir).absolute() / f"{step:08d}"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path / 'meta.json'}: {e}", hint="resume from another step, or start afresh with --force"
        ) from None
    try:
        with _ocp().StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path / "tree", abstract_tree)
    except Exception as e:  # noqa: BLE001 (Orbax raises many types; all mean the same to the user)
        raise CheckpointError(
            f"cannot restore the training state {path}: {e}",
            hint="the model, optimizer or loss settings must match the run that wrote it",
        ) from None
    return tree, meta
