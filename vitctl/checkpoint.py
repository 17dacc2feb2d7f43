"""The checkpoint directory: one layout for every command (shared/DESIGN.md).

    config.json        {"vitctl_version", "model": ViTConfig dict, "provenance": {...}}
    params/            JAX: Orbax checkpoint of the parameters (format "vitctl-jax")
    model.safetensors  torch: state_dict arrays, metadata {"format": "pt"} ("vitctl-torch"),
                       or HF shards model-0000i-of-0000N.safetensors + model.safetensors.index.json

A directory may hold both weight sets; `detect_formats` lists what is there and
`detect_format` picks one (JAX first unless told otherwise).

- params/ stores the parameters as the nested dict of NNX path parts
  ({"blocks": {"q": {"kernel": (L, D, N, K)}}, ...}), the structure that
  `nnx.state(model, nnx.Param).to_pure_dict()` has, so Orbax names each array
  `blocks.q.kernel`. Every array is cut into chunks of at most `chunk_bytes`
  (SaveArgs.chunk_byte_size; Orbax's default is one piece of up to 2 GiB), and stacked
  block parameters are split along the layer axis first (SaveArgs.shard_axes=(0,)),
  so a reader can stream one layer at a time. `save_jax` (init, train) writes Orbax's
  OCDBT layout uncompressed; `vitctl convert` writes Orbax's one-directory-per-array
  layout (vitctl.convert.io.OrbaxFilesWriter); Orbax restores both, and zstd-compressed
  checkpoints from elsewhere too. Restores always go into an abstract target built from
  the config, never from the stored metadata alone.
- model.safetensors (or its shards) is written and read one tensor at a time by
  vitctl.convert.io (headers validated, no mmap): bfloat16 is ml_dtypes.bfloat16 on the
  numpy side and BF16 in the file. Never pickle.
- Writes are atomic: build everything in a temporary sibling, then rename
  (`atomic_output`).

jax, orbax and torch are imported inside the functions that need them; importing
this module loads neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import vitctl
from vitctl.config import ViTConfig, load_config
from vitctl.errors import CheckpointError, ConfigError, MissingDependencyError, OutputExistsError

CONFIG, PARAMS, SAFETENSORS = "config.json", "params", "model.safetensors"
RUN_MARKER = "vitctl-run.json"  # marks a directory of several checkpoints that vitctl made (demo, train runs)
SAFETENSORS_INDEX = "model.safetensors.index.json"  # beside HF-style shards model-0000i-of-0000N.safetensors
JAX, TORCH = "vitctl-jax", "vitctl-torch"
# One stored chunk of params/ is at most this many bytes: small enough that a streaming
# reader holds only a few in memory and that one layer slice spans several chunks, which
# tensorstore encodes and decodes on several threads (a 64 MiB layer in one chunk used one:
# 16 MiB chunks read 2.5x and write 1.9x faster with zstd on 2 cores); large enough that
# per-chunk overhead is negligible. ViT-22B's mlp_in, (48, 6144, 24576) in fp32, is stored as
# 48 * 36 chunks of (1, 2048, 2048) = 16 MiB.
CHUNK_BYTES = 16 * 2**20
INIT_HINT = "create a checkpoint with `vitctl init MODEL --out DIR`"


@contextlib.contextmanager
def atomic_output(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yields an empty temporary sibling of `dst`; on success it becomes `dst`.

    On any exception (KeyboardInterrupt included) the temporary is deleted and `dst`
    is untouched. An existing `dst` is refused unless `force`; with `force` it is
    replaced only once the new one is complete, and only if it is a directory that is
    empty or holds a config.json (so `--force` cannot delete an unrelated folder).
    """
    dst = Path(dst)
    _check_replaceable(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _check_replaceable(dst, force)  # something may have appeared meanwhile
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
            dst.rename(old)
            try:
                tmp.rename(dst)
            except BaseException:
                old.rename(dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        remove_tree(tmp)
        raise


def remove_tree(path: Path, tries: int = 40) -> None:
    """rmtree, repeated while the tree still exists: a library thread still finishing a write
    (tensorstore's or Orbax's, after an interrupt or a failed save) may add an entry while the
    tree is being removed. Waits at most ~8 s in all."""
    for k in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(min(0.25, 0.05 * (k + 1)))


def check_output(dst: str | Path, force: bool) -> None:
    """Raises OutputExistsError unless `dst` is absent, or replaceable with `force` (see atomic_output)."""
    _check_replaceable(Path(dst), force)


def _check_replaceable(dst: Path, force: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"{dst} already exists", hint="pass --force to replace it, or choose another output path")
    ours = (dst / CONFIG).is_file() or (dst / RUN_MARKER).is_file()
    if dst.is_symlink() or not dst.is_dir() or (any(dst.iterdir()) and not ours):
        raise OutputExistsError(
            f"{dst} exists and is not a vitctl checkpoint directory; refusing to replace it even with --force",
            hint="remove it yourself or choose another output path",
        )


def write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON atomically: a temporary file in the same directory, then os.replace."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_config(ckpt: str | Path, cfg: ViTConfig, provenance: Mapping[str, Any]) -> Path:
    """Writes ckpt/config.json. provenance: source_format, source, created_by, ..."""
    path = Path(ckpt) / CONFIG
    write_json(path, {"vitctl_version": vitctl.__version__, "model": cfg.to_dict(), "provenance": dict(provenance)})
    return path


def read_checkpoint_config(path: str | Path) -> ViTConfig:
    """The ViTConfig of a checkpoint directory (or of a bare config.json)."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a vitctl checkpoint: it has no {CONFIG}", hint=INIT_HINT)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or config file: {path}", hint=INIT_HINT)
    return load_config(path)


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance block of a checkpoint's config.json ({} if it has none)."""
    path = Path(path)
    try:
        d = json.loads((path / CONFIG if path.is_dir() else path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    return d.get("provenance", {}) if isinstance(d, dict) else {}


def detect_formats(path: str | Path) -> list[str]:
    """The weight sets a checkpoint directory holds, from its content: JAX, then torch."""
    path = Path(path)
    found = []
    if (path / PARAMS / "_METADATA").is_file() or (path / PARAMS / "_CHECKPOINT_METADATA").is_file():
        found.append(JAX)
    if (path / SAFETENSORS).is_file() or (path / SAFETENSORS_INDEX).is_file():
        found.append(TORCH)
    return found


def detect_format(path: str | Path, prefer: str | None = None) -> str:
    """ "vitctl-jax" or "vitctl-torch"; with both present, `prefer` if given, else JAX."""
    found = detect_formats(path)
    if not found:
        raise CheckpointError(
            f"{path} holds no weights: neither {PARAMS}/ (an Orbax checkpoint) nor {SAFETENSORS}",
            hint=INIT_HINT,
        )
    return prefer if prefer in found else found[0]


# JAX: params/ (Orbax).
def _orbax():
    try:
        import jax
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise MissingDependencyError(f"JAX checkpoints need jax and orbax-checkpoint ({e})", hint="pip install 'vitctl[jax]'") from None
    return jax, ocp


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"blocks/q/kernel": x} -> {"blocks": {"q": {"kernel": x}}}."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_jax(ckpt: str | Path, flat: Mapping[str, Any], chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Writes ckpt/params/ from {"/"-joined NNX path: array} (jax or numpy arrays).

    Each array is stored in chunks of at most `chunk_bytes`, uncompressed; stacked block
    parameters (`blocks/x/y`, leading L axis) are cut along L first, so no chunk spans two layers.
    """
    _, ocp = _orbax()
    path = (Path(ckpt) / PARAMS).absolute()

    def args(name: str):
        stacked = name.startswith("blocks/") and not name.split("/")[1].isdigit()
        return ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if stacked else ())

    save_args = {n: args(n) for n in flat}
    # Orbax's layout (OCDBT, zarr), chunks stored uncompressed: zstd saves ~8% of float weights'
    # bytes and costs ~2 CPU-s per GB at every read (vitctl convert, probe, verify).
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(_nest(flat), save_args=_nest(save_args)))
    return path


def load_jax(ckpt: str | Path, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Reads ckpt/params/ into numpy arrays, with the shapes and param_dtype of `cfg`."""
    from vitctl.convert.mapping import check_coverage, jax_param_shapes

    jax, ocp = _orbax()
    path = (Path(ckpt) / PARAMS).absolute()
    if JAX not in detect_formats(ckpt):
        raise CheckpointError(f"{ckpt} has no JAX weights ({PARAMS}/)", hint=f"found: {', '.join(detect_formats(ckpt)) or 'none'}")
    expected = jax_param_shapes(cfg)
    with ocp.StandardCheckpointer() as ckptr:
        try:  # the stored metadata only checks names and shapes, for a clear error
            stored = _flatten(ckptr.metadata(path).item_metadata.tree)
        except Exception as e:
            raise CheckpointError(f"cannot read the Orbax metadata of {path}: {e}") from None
        check_coverage({n: tuple(m.shape) for n, m in stored.items()}, expected, f"{path}")
        dtype = jax.numpy.dtype(cfg.param_dtype)
        # One local device, whatever the writer's topology (a multi-process save records its own).
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = _nest({n: jax.ShapeDtypeStruct(s, dtype, sharding=one) for n, s in expected.items()})
        try:
            restored = ckptr.restore(path, target)
        except Exception as e:
            raise CheckpointError(f"cannot restore {path}: {e}") from None
    return {n: np.asarray(a) for n, a in _flatten(restored).items()}


# torch: model.safetensors (or shards + index).
def save_torch(ckpt: str | Path, state: Mapping[str, np.ndarray], max_shard_bytes: int | None = None) -> Path:
    """Writes ckpt/model.safetensors (or shards + index past max_shard_bytes) from state_dict arrays (numpy; bf16 as ml_dtypes).

    Returns the file written (the index when sharded).
    """
    from vitctl.convert import io

    specs = [(n, tuple(np.shape(a)), np.asarray(a).dtype) for n, a in state.items()]
    writer = io.SafetensorsWriter(ckpt, specs, max_shard_bytes, metadata={"format": "pt"})
    try:
        for n, a in state.items():
            writer.write(n, np.ascontiguousarray(a))  # jax_to_torch returns transposed views
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return Path(ckpt) / writer.files[-1]


def load_torch(ckpt: str | Path, cfg: ViTConfig | None = None) -> dict[str, np.ndarray]:
    """Reads ckpt's safetensors (one file or shards) into numpy arrays; checks names and shapes if `cfg` is given."""
    from vitctl.convert import io

    if TORCH not in detect_formats(ckpt):
        raise CheckpointError(f"{ckpt} has no torch weights ({SAFETENSORS})", hint=f"found: {', '.join(detect_formats(ckpt)) or 'none'}")
    reader = io.SafetensorsReader(ckpt)
    try:
        if cfg is not None:
            from vitctl.convert.mapping import check_coverage, torch_param_shapes

            check_coverage({n: i.shape for n, i in reader.infos().items()}, torch_param_shapes(cfg), f"{ckpt}")
        return {n: np.array(a) for n, a in reader.iter_tensors(list(reader.infos()))}  # writable copies, not views of the file
    finally:
        reader.close()
