"""What `vitctl train --backend torch` saves: training states under OUT/state/ for exact resume, and OUT's checkpoint.

    state/00000020/config.json        the run's ViTConfig: with model.safetensors, a vitctl-torch
    state/00000020/model.safetensors  checkpoint of the step's full (gathered) parameters, float32
    state/00000020/optimizer.npz      the optimizer's tensors, one array per "<param name>/<field>"
    state/00000020/meta.json          {"step", "backend": "torch", "data": StreamLoader.state(),
                                       "optimizer": {"param_groups", "scalars"}, "processes", "time"}

The state is whole, not sharded: every process gathers its shards (DCP's get_*_state_dict with
full_state_dict, offloaded to the CPU) and process 0 writes, so a state resumes onto any number
of processes (set_*_state_dict with full_state_dict hands each process its slice). Nothing is
ever unpickled: the parameters are safetensors read through vitctl.open, the optimizer's
tensors an .npz of plain arrays (np.load with allow_pickle=False), the rest JSON.

As for the JAX states (vitctl.train.state): each step directory is written under a temporary
name and renamed when complete (SIGKILL at any moment leaves only whole states), the last
`keep` are kept, and a save that cannot fit is refused before anything is written.
OUT/model.safetensors is the latest state's file, hard-linked (one copy on disk), then renamed
into place, so OUT is a vitctl-torch checkpoint that `vitctl convert`, `verify`, `eval` read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitctl import checkpoint as ckpt
from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, ConfigError
from vitctl.formats import layout
from vitctl.train import state as tstate
from vitctl.train import torch_dist

BACKEND = "torch"
OPTIMIZER = "optimizer.npz"
_NUMPY_UNSAFE = {torch.bfloat16: np.uint16}  # stored as their bits; meta.json names the dtype


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather(model: nn.Module, opt) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(parameters, optimizer state) whole on process 0 ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    params = get_model_state_dict(model, options=_options())
    if not opt.state:
        # A stateless optimizer (SGD without momentum): DCP would first "initialise" its state with an
        # optimizer step on zero gradients, which moves the parameters (weight decay) and counts a step.
        names = {p: n for n, p in model.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]} for g in opt.param_groups]
        return params, {"state": {}, "param_groups": groups}
    return params, get_optimizer_state_dict(model, opt, options=_options())


def _flat_optimizer(osd: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """DCP's full optimizer state -> (arrays by "<param>/<field>", JSON: param_groups, non-tensor values, odd dtypes)."""
    arrays, scalars, dtypes = {}, {}, {}
    for name, fields in osd["state"].items():
        for field, v in fields.items():
            key = f"{name}/{field}"
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
                if v.dtype in _NUMPY_UNSAFE:
                    dtypes[key] = str(v.dtype).removeprefix("torch.")
                    v = v.view(torch.int16).numpy().view(_NUMPY_UNSAFE[v.dtype])
                arrays[key] = np.asarray(v)
            else:
                scalars[key] = v
    return arrays, {"param_groups": osd["param_groups"], "scalars": scalars, "dtypes": dtypes}


def _nest_optimizer(arrays: dict[str, np.ndarray], record: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, a in arrays.items():
        name, field = key.rsplit("/", 1)
        t = torch.from_numpy(np.array(a))
        if key in record.get("dtypes", {}):
            t = t.view(getattr(torch, record["dtypes"][key]))
        state.setdefault(name, {})[field] = t
    for key, v in record.get("scalars", {}).items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = v
    return {"state": state, "param_groups": record["param_groups"]}


def save(state_dir: Path, step: int, model: nn.Module, opt, cfg: ViTConfig, meta: dict[str, Any], keep: int) -> Path:
    """Writes state_dir/{step:08d} (gathered, by process 0) atomically, then keeps the newest `keep`.

    Every process calls it (the gather is collective), and every process raises when the save
    fails: a save that does not fit is refused before anything is written, and a failed write
    leaves the complete states as they were (CheckpointError naming the latest)."""
    d = Path(state_dir).absolute()
    params, osd = gather(model, opt)
    primary = torch.distributed.get_rank() == 0 if torch.distributed.is_initialized() else True
    arrays, record = _flat_optimizer(osd) if primary else ({}, {})
    nbytes = sum(t.numel() * t.element_size() for t in params.values()) + sum(a.nbytes for a in arrays.values())
    reason = tstate.room_for(d.parent, nbytes) if primary else None
    if torch_dist.any_process(int(reason is not None)):
        raise tstate._save_failed(d, step, reason or "process 0 has no room for it")
    failure = None
    if primary:
        try:
            _write(d, step, params, arrays, cfg, {"step": step, "backend": BACKEND, **meta, "optimizer": record, "time": time.time()})
        except Exception as e:  # noqa: BLE001 (told to every process below)
            failure = e
    if torch_dist.any_process(int(failure is not None)):
        if isinstance(failure, CheckpointError):
            raise failure
        brief = str(failure).strip().splitlines()[0] if failure is not None and str(failure).strip() else type(failure).__name__
        raise tstate._save_failed(d, step, brief if failure is not None else "process 0 could not write it") from failure
    if primary:
        for old in tstate.steps(d)[:-keep]:
            shutil.rmtree(d / f"{old:08d}", ignore_errors=True)
        tstate._reclaim(d)
    torch_dist.sync()
    return d / f"{step:08d}"


def _write(d: Path, step: int, params: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], cfg: ViTConfig, info: dict) -> None:
    """Process 0's part of `save`: the step directory under a temporary name, renamed into place when whole."""
    final, tmp = d / f"{step:08d}", d / f".tmp-{step:08d}"
    d.mkdir(parents=True, exist_ok=True)
    tstate._reclaim(d)  # left by a killed run
    tmp.mkdir()
    try:
        layout.save_torch(tmp, {n: t.numpy() for n, t in params.items()})
        ckpt.write_config(tmp, cfg, {"source_format": "train", "created_by": "vitctl train --backend torch", "step": step})
        np.savez(tmp / OPTIMIZER, **arrays)
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():  # a rerun of the same step: moved aside whole
            shutil.rmtree(d / f".tmp-old-{step:08d}", ignore_errors=True)
            final.rename(d / f".tmp-old-{step:08d}")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def restore(state_dir: Path, step: int, model: nn.Module, opt, cfg: ViTConfig) -> dict[str, Any]:
    """Loads state `step` (saved with any process count) into the sharded model and its optimizer; returns meta.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from vitctl.open import open_checkpoint

    d = Path(state_dir).absolute()
    meta = tstate.read_meta(d, step)
    path = d / f"{step:08d}"
    if meta.get("backend") != BACKEND:
        raise ConfigError(
            f"the training state {path} was written by the {meta.get('backend', 'jax')} trainer; --backend torch cannot resume it",
            hint=f"resume it with --backend {meta.get('backend', 'jax')}, or start a new torch run in another --out",
        )
    try:
        with open_checkpoint(path, fmt=layout.TORCH, model=cfg) as source:
            source.check_coverage()
            params = {n: torch.from_numpy(np.array(source.reader.read(n))) for n in source.infos}
        with np.load(path / OPTIMIZER, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        osd = _nest_optimizer(arrays, meta["optimizer"])
    except (OSError, ValueError, KeyError) as e:
        raise tstate._damaged(d, step, f"{type(e).__name__}: {e}") from None
    except CheckpointError as e:
        raise tstate._damaged(d, step, e.message) from None
    options = StateDictOptions(full_state_dict=True, strict=True)
    # The optimizer first: DCP creates an empty optimizer's state with a step on zero gradients, which
    # moves the parameters (weight decay); the parameters loaded after it are the saved ones exactly.
    if osd["state"]:
        set_optimizer_state_dict(model, opt, osd, options=options)
    else:  # a stateless optimizer (DCP loads no empty state): its param groups, with the step count, are all it has
        for group, saved in zip(opt.param_groups, osd["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
    set_model_state_dict(model, params, options=options)
    return meta


def publish(out: Path, step_dir: Path, cfg: ViTConfig, provenance: dict[str, Any]) -> None:
    """OUT/model.safetensors + config.json from a saved state (process 0): a hard link, renamed into place."""
    src, dst = step_dir / layout.SAFETENSORS, out / layout.SAFETENSORS
    tmp = out / f".{layout.SAFETENSORS}.tmp-{step_dir.name}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links: a copy
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    ckpt.write_config(out, cfg, provenance)
