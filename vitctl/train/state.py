"""What a run saves: training-state checkpoints under OUT/state/ for exact resume, and OUT/params/.

    state/00000020/tree/     Orbax (StandardCheckpointer): {"params", "opt", "step"}
    state/00000020/meta.json {"step", "rng", "data": StreamLoader.state(), "mesh", "time"}
    state/00000020/data/process_0-of-2.json  each process's own data record (its slice, skipped
                             examples, grain's iterator state), as Orbax's grain handler writes it

Each step directory is written under a temporary name and renamed when complete, so
a run killed at any moment (SIGKILL included) leaves only whole checkpoints; `latest`
ignores anything else. The last `keep` are kept.

A save that cannot fit is refused before anything is written: the state's size is checked
against the free disk space and the file size limit (ulimit -f) first. Orbax cannot be
stopped cleanly once it writes: when one of its writes fails it raises at once while its
other TensorStore writes still run, and those recreate their directories after a removal.
So a failure it would only find half-way (a full disk, a file-size limit) is found before
it starts, and the temporary of a save that fails anyway is reclaimed by the next save.

Restores go into an abstract target (jax.ShapeDtypeStruct with the *current* mesh's
shardings, from jax.eval_shape), so a state saved on one mesh shape restores onto
another: Orbax reshards on read.

write_params replaces OUT/params/ (+ config.json), the standard checkpoint layout that
`vitctl convert` and `verify` read, as a whole: written beside, then swapped in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitctl import checkpoint as ckpt
from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError
from vitctl.formats import layout
from vitctl.train.distributed import any_process, sync
from vitctl.untrusted import free_disk, read_json

STATE = "state"  # OUT/state/
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


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def room_for(directory: str | Path, nbytes: int) -> str | None:
    """Why `nbytes` (uncompressed: Orbax's files are at most that) cannot be written under `directory`, or None.

    One OCDBT data file may hold the whole tree, so the file size limit is compared with all
    of it."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and nbytes > limit:
        return f"{os.strerror(errno.EFBIG)}: a file of up to {_size(nbytes)}, over the file size limit of {_size(limit)}"
    free, p = free_disk(directory)
    if free is not None and nbytes + 2**20 > free:  # + metadata files
        return f"{os.strerror(errno.ENOSPC)}: up to {_size(nbytes)} to write, {_size(free)} free on {p}"
    return None


def tree_bytes(tree: Any) -> int:
    import jax
    import numpy as np

    return sum(int(getattr(x, "nbytes", None) or np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def _quiet_orphans() -> None:
    """Drops the one message an abandoned TensorStore operation leaves when it completes.

    When one read or write of an Orbax call fails, Orbax closes its event loop while the
    call's other TensorStore operations still run; each of them, completing, reports
    "RuntimeError: Event loop is closed" through sys.unraisablehook (a traceback on stderr
    per array, after vitctl has already said what failed). Likewise the tasks it abandons
    are logged by asyncio, when collected, as "Task exception was never retrieved" with a
    traceback. Only those two messages are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_vitctl_orphans", False):
        return
    logging.getLogger("asyncio").addFilter(lambda r: not str(r.msg).startswith("Task exception was never retrieved"))

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    hook._vitctl_orphans = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax's own log lines (absl WARNING/ERROR on stderr) off while it runs: vitctl reports what failed, once."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _reclaim(d: Path) -> None:
    """Removes the temporaries that a killed or failed save left in `d` (vitctl's own: `.tmp-<step>`, `.tmp-old-<step>`)."""
    for stale in d.glob(".tmp-*"):
        if re.fullmatch(r"\.tmp-(old-)?\d{8}", stale.name):
            shutil.rmtree(stale, ignore_errors=True)


def _save_failed(d: Path, step: int, reason: str) -> CheckpointError:
    """The error for a state save that failed or was refused: names the latest complete state."""
    last = latest(d)
    return CheckpointError(
        f"cannot save the training state of step {step} in {d}: {reason}",
        hint="check the free disk space and the file size limit (ulimit -f); "
        + (
            f"the latest complete state, step {last}, is intact: continue from it with --resume"
            if last is not None
            else "no complete training state was saved"
        ),
    )


def save(state_dir: str | Path, step: int, tree: Any, meta: dict[str, Any], keep: int = 3, process_meta: dict | None = None) -> Path:
    """Writes state_dir/{step:08d} atomically; then deletes all but the newest `keep` (and stale temporaries).

    With several processes every process calls this: each writes the shards it holds
    (Orbax), and process 0 writes meta.json and renames the directory into place once all
    have finished (barriers before and after, so no process runs ahead of the commit).
    A save that does not fit (disk space, file size limit) is refused before anything is
    written; any failed write leaves the complete checkpoints as they were. Both raise
    CheckpointError naming the latest complete one. `process_meta`: this process's own
    record, written by each process as data/process_<i>-of-<n>.json.
    """
    import jax

    d = Path(state_dir).absolute()
    primary = jax.process_index() == 0
    final = d / f"{step:08d}"
    # One name that every process computes alike (a random one would differ between processes).
    tmp = d / f".tmp-{step:08d}"

    _quiet_orphans()
    # Every process checks its own limits; all refuse together (a lone refusal would leave the others at a barrier).
    reason = room_for(d, tree_bytes(tree))
    if any_process(int(reason is not None)):
        raise _save_failed(d, step, reason or "another process has no room for its part")
    if primary:
        d.mkdir(parents=True, exist_ok=True)
        _reclaim(d)  # left by a killed run
        tmp.mkdir()
    sync(f"vitctl-state-begin-{step}")
    try:
        try:
            # Closing the checkpointer waits for its background commit, so nothing of Orbax's own runs on below.
            with _orbax_quiet(), _ocp().StandardCheckpointer() as ckptr:
                ckptr.save(tmp / "tree", tree)
                ckptr.wait_until_finished()
            if process_meta is not None:
                own = tmp / process_file(jax.process_index(), jax.process_count())
                own.parent.mkdir(exist_ok=True)
                own.write_text(json.dumps(process_meta) + "\n")
            sync(f"vitctl-state-written-{step}")
            if primary:
                (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
                if final.exists():  # a rerun of the same step: moved aside whole (deleting in place could leave half of it)
                    shutil.rmtree(d / f".tmp-old-{step:08d}", ignore_errors=True)
                    final.rename(d / f".tmp-old-{step:08d}")
                tmp.rename(final)
        except Exception as e:
            raise _save_failed(d, step, _brief(e)) from e
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if primary:
        for old in steps(d)[:-keep] if keep > 0 else []:
            shutil.rmtree(d / f"{old:08d}", ignore_errors=True)
        _reclaim(d)
    sync(f"vitctl-state-done-{step}")
    return final


def _brief(e: BaseException) -> str:
    """The first line of a TensorStore/Orbax error, without the JSON spec it appends (KBs of it)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)
    return text if len(text) <= 400 else text[:400] + " ..."


def _damaged(d: Path, step: int, what: str) -> CheckpointError:
    """The error for a damaged state: names it, and offers the complete state before it."""
    path = d / f"{step:08d}"
    earlier = [s for s in steps(d) if s < step]
    if earlier:
        hint = f"resume from step {earlier[-1]}, the complete state before it: delete {path} (rm -r {path}) and run the same command again"
    else:
        hint = f"no earlier state is saved: delete {path} and start the run afresh (vitctl train ... --force)"
    return CheckpointError(f"the training state of step {step}, {path}, is damaged: {what}", hint=hint)


def read_meta(state_dir: str | Path, step: int) -> dict[str, Any]:
    """state_dir/{step}/meta.json, checked: a damaged one is an error naming the state and the one before."""
    d = Path(state_dir).absolute()
    try:
        meta = read_json(d / f"{step:08d}" / "meta.json")
    except CheckpointError as e:
        raise _damaged(d, step, f"meta.json cannot be read ({e.message})") from None
    data = meta.get("data")
    if meta.get("step") != step or not isinstance(data, dict):
        raise _damaged(d, step, "meta.json does not describe this step and its data position")
    return meta


def process_file(index: int, count: int) -> str:
    """A process's own data record inside a state directory."""
    return f"data/process_{index}-of-{count}.json"


def read_process_meta(state_dir: str | Path, step: int, index: int, count: int) -> dict[str, Any] | None:
    """Process `index` of `count`'s own record in state `step`, or None (saved by another process count, or before them)."""
    path = Path(state_dir).absolute() / f"{step:08d}" / process_file(index, count)
    if not path.is_file():
        return None
    record = read_json(path)
    return record if isinstance(record, dict) else None


def _mismatch(stored: Any, abstract_tree: Any) -> str | None:
    """What differs between the saved tree's metadata and the tree these settings restore into, or None."""
    import jax

    def name(k) -> str:  # Orbax stores a NamedTuple's fields (optax states) as dict keys: compare names only
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    def flat(tree):
        return {"/".join(name(k) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(tree)}

    have, want = flat(stored), flat(abstract_tree)
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"these settings need {len(missing)} array(s) it lacks, e.g. {missing[0]}")
        if extra:
            parts.append(f"it holds {len(extra)} array(s) these settings do not, e.g. {extra[0]}")
        return "; ".join(parts)
    for k, w in want.items():
        shape = getattr(have[k], "shape", None)
        if shape is not None and tuple(shape) != tuple(w.shape):
            return f"{k} is saved with shape {tuple(shape)}, these settings need {tuple(w.shape)}"
    return None


def restore(state_dir: str | Path, step: int, abstract_tree: Any) -> tuple[Any, dict[str, Any]]:
    """(tree restored into `abstract_tree`'s shapes, dtypes and shardings, meta dict).

    A state that does not fit the settings (another optimizer, model or loss) and a damaged
    one (a file cut short or garbled) are told apart: the saved tree's metadata is compared
    with the target first, and only a read that fails after that is damage."""
    d = Path(state_dir).absolute()
    path = d / f"{step:08d}"
    meta = read_meta(d, step)
    _quiet_orphans()
    with _orbax_quiet(), _ocp().StandardCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(path / "tree")
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
        except Exception as e:  # noqa: BLE001 (Orbax raises many types; all mean the metadata is unreadable)
            raise _damaged(d, step, f"its array metadata cannot be read ({_brief(e)})") from None
        if not stored:  # Orbax logs a warning and returns None when its index (OCDBT) cannot be read
            raise _damaged(d, step, "its array index cannot be read (a file under tree/ is cut short, garbled or missing)")
        mismatch = _mismatch(stored, abstract_tree)
        if mismatch:
            raise CheckpointError(
                f"the training state {path} does not fit these settings: {mismatch}",
                hint="resume with the settings of the run that wrote it (drop the flags that change the model, "
                "optimizer or loss), or start afresh with --force",
            )
        try:
            tree = ckptr.restore(path / "tree", abstract_tree)
        except Exception as e:  # noqa: BLE001 (Orbax raises many types; after the metadata matched, all mean damage)
            raise _damaged(d, step, f"its arrays cannot be read ({_brief(e)})") from None
    return tree, meta


def write_params(out: Path, cfg: ViTConfig, params, provenance: dict[str, Any], tag: str = "") -> None:
    """OUT/params/ (+ config.json), replaced as a whole: written beside, then swapped in.

    With several processes every process calls this with the same `tag` (the step): each
    writes the shards it holds into one temporary directory (Orbax), and process 0 swaps it
    in once all have finished.
    """
    import jax

    primary = jax.process_index() == 0
    tmp = out / f".params.tmp-{tag or secrets.token_hex(4)}"

    def failed(reason: str) -> CheckpointError:
        return CheckpointError(
            f"cannot write {out / layout.PARAMS}: {reason}",
            hint="check the free disk space and the file size limit (ulimit -f); the training state under "
            f"{out / STATE} is complete: continue with --resume once there is room",
        )

    # Checked before Orbax starts: a write it fails half-way leaves TensorStore writes running (module docstring).
    reason = room_for(out, tree_bytes(params))
    if any_process(int(reason is not None)):
        raise failed(reason or "another process has no room for its part")
    if primary:
        for stale in out.glob(".params.*-*"):  # left by a killed run: .params.tmp-<tag> / .params.old-<hex>
            if re.fullmatch(r"\.params\.(tmp|old)-[0-9a-f]{8}", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    sync(f"vitctl-params-begin-{tag}")
    try:
        try:
            layout.save_jax(tmp, layout.flatten(params))
        except Exception as e:  # Orbax and tensorstore raise many types for a failed write
            raise failed(_brief(e)) from e
        sync(f"vitctl-params-written-{tag}")
        if primary:
            old = out / f".params.old-{secrets.token_hex(4)}"
            if (out / layout.PARAMS).exists():
                (out / layout.PARAMS).rename(old)
            (tmp / layout.PARAMS).rename(out / layout.PARAMS)
            shutil.rmtree(old, ignore_errors=True)
            ckpt.write_config(out, cfg, provenance)
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    sync(f"vitctl-params-done-{tag}")


def fresh_run(out: Path, cfg: ViTConfig, provenance: dict[str, Any], primary: bool, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Runs a new run in `out` (either backend's; `primary`: this is process 0, which writes); on failure
    before its first saved state leaves no partial run directory and gives back the run it replaced.

    --force over an earlier run: it is set aside, not deleted, until this run has saved a state, so a
    new run that fails or is stopped before its first save gives the earlier run back untouched.
    """
    previous = None
    try:
        if primary:
            if out.exists():
                previous = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
                out.rename(previous)
            out.mkdir(parents=True)
            ckpt.write_config(out, cfg, {k: v for k, v in provenance.items() if k != "seed"})
        return run()
    except BaseException:
        # A new run that failed or was stopped before its first saved state leaves no partial run directory.
        if primary and latest(out / STATE) is None:
            shutil.rmtree(out, ignore_errors=True)
            if previous is not None and not out.exists():
                previous.rename(out)
                previous = None
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
