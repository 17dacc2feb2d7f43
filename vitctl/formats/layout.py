"""The checkpoint directory: one layout for every command.

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
  (Orbax's default is one piece of up to 2 GiB), and stacked block parameters are split
  along the layer axis first, so a reader can stream one layer at a time. `save_jax` (init,
  train) writes Orbax's OCDBT layout uncompressed (formats.orbax.OrbaxWriter; Orbax itself
  for arrays sharded over several processes); `vitctl convert` writes Orbax's
  one-directory-per-array layout with the same writer; Orbax restores both, and
  formats.orbax.OrbaxReader reads both, and zstd-compressed checkpoints from elsewhere too.
- model.safetensors (or its shards) is written and read one tensor at a time by
  formats.safetensors (headers validated, tensors mapped from the file): bfloat16 is
  ml_dtypes.bfloat16 on the numpy side and BF16 in the file. Never pickle.

jax and orbax are imported only by `save_jax`, for arrays sharded over several processes, and
the formats' readers and writers only by the functions that use them: importing this module
(as `vitctl --help` and `vitctl info` do, through vitctl.checkpoint) loads none of them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitctl.config import ViTConfig, load_config
from vitctl.errors import CheckpointError, ConfigError, MissingDependencyError, VitctlError
from vitctl.formats.base import CHECKPOINT_METADATA, CHUNK_BYTES, METADATA, SAFETENSORS, Writer, hf_snapshot
from vitctl.formats.base import INDEX as SAFETENSORS_INDEX
from vitctl.params import check_coverage, is_stacked, jax_param_shapes, layer_name, split_layer, torch_param_shapes
from vitctl.untrusted import read_json

CONFIG, PARAMS = "config.json", "params"
JAX, TORCH, TIMM = "vitctl-jax", "vitctl-torch", "timm"  # TIMM: timm's hub layout (`vitctl convert ... --format timm`, or timm's own)
HF = "hf"  # Hugging Face transformers' ViT: config.json with model_type "vit"
PREPROCESSOR = "preprocessor_config.json"  # HF's image processor settings
INIT_HINT = "create a checkpoint with `vitctl init MODEL --out DIR`"
SLEEP_ENV = "VITCTL_TEST_SLEEP_PER_TENSOR"  # tests only (as for convert): seconds to pause after each tensor written


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
    d = read_json(path / CONFIG if path.is_dir() else path, ConfigError)
    provenance = d.get("provenance", {})
    return provenance if isinstance(provenance, dict) else {}


def detect_formats(path: str | Path) -> list[str]:
    """The weight sets a checkpoint directory holds, from its content: JAX, then torch; safetensors
    beside timm's hub config.json (`architecture` + `model_args` or `pretrained_cfg`) are timm's,
    beside a config.json with model_type "vit" Hugging Face transformers', else vitctl-torch."""
    path = Path(path)
    found = []
    if (path / PARAMS / METADATA).is_file() or (path / PARAMS / CHECKPOINT_METADATA).is_file():
        found.append(JAX)
    if (path / SAFETENSORS).is_file() or (path / SAFETENSORS_INDEX).is_file():
        found.append(TIMM if is_timm_config(path / CONFIG) else HF if is_hf_config(path / CONFIG) else TORCH)
    return found


def detect_format(path: str | Path, prefer: str | None = None) -> str:
    """ "vitctl-jax", "vitctl-torch" or "timm"; with several present, `prefer` if given, else JAX."""
    found = detect_formats(path)
    if not found:
        raise CheckpointError(
            f"{path} holds no weights: neither {PARAMS}/ (an Orbax checkpoint) nor {SAFETENSORS}",
            hint=INIT_HINT,
        )
    return prefer if prefer in found else found[0]


def is_timm_config(path: str | Path) -> bool:
    """Whether `path` is timm's hub config.json: `architecture`, with `model_args` or `pretrained_cfg`."""
    with contextlib.suppress(VitctlError, OSError):
        d = read_json(path, CheckpointError)
        return (
            isinstance(d, dict)
            and "architecture" in d
            and (isinstance(d.get("model_args"), dict) or isinstance(d.get("pretrained_cfg"), dict))
        )
    return False


def is_hf_config(path: str | Path) -> bool:
    """Whether `path` is the config.json of a Hugging Face transformers ViT (model_type "vit")."""
    with contextlib.suppress(VitctlError, OSError):
        d = read_json(path, CheckpointError)
        return isinstance(d, dict) and d.get("model_type") == "vit"
    return False


def timm_export_error(where: str | Path, doing: str, load: str | None = None) -> CheckpointError:
    """The refusal for a timm export given to a command that reads vitctl's own checkpoints.
    `load`: the timm.create_model name that loads it (default: local-dir:WHERE)."""
    if load is None:  # a Hugging Face cache snapshot loads by its repo id, anything else by its folder
        snapshot = hf_snapshot(Path(where).absolute())
        load = f"hf-hub:{snapshot}" if snapshot else f"local-dir:{Path(where).absolute()}"
    return CheckpointError(
        f"{where} is a timm export (written by --format timm) or timm's own checkpoint; {doing} does not read timm checkpoints",
        hint=f"`vitctl convert torch-to-jax` reads it, or convert from the vitctl-torch or vitctl-jax checkpoint it came from; timm itself loads it: "
        f"timm.create_model({load!r}, pretrained=True)",
    )


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"blocks/q/kernel": x} -> {"blocks": {"q": {"kernel": x}}}."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"blocks": {"q": {"kernel": x}}} -> {"blocks/q/kernel": x}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_all(writer: Writer, tensors: Iterable[tuple[str, Any]]) -> None:
    """Writes every tensor and closes the writer; on any failure (Ctrl-C included) aborts it, so
    that no background write lands after the caller removes the directory."""
    try:
        for name, array in tensors:
            writer.write(name, array)
            if seconds := float(os.environ.get(SLEEP_ENV, "0") or 0):
                time.sleep(seconds)
        writer.close()
    except BaseException:
        writer.abort()
        raise


# JAX: params/ (Orbax).
def save_jax(ckpt: str | Path, flat: Mapping[str, Any], chunk_bytes: int = CHUNK_BYTES) -> Path:
    """Writes ckpt/params/ from {"/"-joined NNX path: array} (jax or numpy arrays).

    Each array is stored in chunks of at most `chunk_bytes`, uncompressed; stacked block
    parameters (`blocks/x/y`, leading L axis) are cut along L first, so no chunk spans two layers.
    Arrays this process holds whole are written one layer at a time by OrbaxWriter (Orbax's
    OCDBT layout): a failed write (full disk, file-size limit) is one CheckpointError, raised
    once every background write has stopped, so nothing lands in ckpt after the caller removes
    it. Arrays sharded over several processes go through Orbax itself, which coordinates the
    processes.
    """
    from vitctl.formats.orbax import OrbaxWriter

    path = (Path(ckpt) / PARAMS).absolute()
    local = all(getattr(a, "is_fully_addressable", True) for a in flat.values())
    if not local or any(split_layer(n)[1] is not None for n in flat):
        return _save_with_orbax(path, flat, chunk_bytes)
    arrays = {n: np.asarray(a) for n, a in flat.items()}  # jax arrays on the CPU: views, not copies
    layers = [(layer_name(n, i), a[i]) for n, a in arrays.items() if is_stacked(n) for i in range(a.shape[0])]
    parts = [(n, a) for n, a in arrays.items() if not is_stacked(n)] + layers
    _write_all(OrbaxWriter(path, [(n, a.shape, a.dtype) for n, a in parts], chunk_bytes, compress=False), parts)
    return path


def _save_with_orbax(path: Path, flat: Mapping[str, Any], chunk_bytes: int) -> Path:
    """params/ written by Orbax's own PyTreeCheckpointHandler (arrays sharded over several processes)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise MissingDependencyError(f"JAX checkpoints need jax and orbax-checkpoint ({e})", hint="pip install 'vitctl[jax]'") from None
    # Chunks of at most chunk_bytes (SaveArgs.chunk_byte_size), stacked blocks split along the layer axis first (shard_axes).
    save_args = {n: ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if is_stacked(n) else ()) for n in flat}
    # Orbax's layout (OCDBT, zarr), chunks stored uncompressed: zstd saves ~8% of float weights'
    # bytes and costs ~2 CPU-s per GB at every read (vitctl convert, probe, verify).
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(nest(flat), save_args=nest(save_args)))
    return path


def load_jax(ckpt: str | Path, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Reads ckpt/params/ into numpy arrays, with the shapes and param_dtype of `cfg`.

    The stored names and shapes are checked against cfg's parameters first; the arrays are then
    read layer by layer through OrbaxReader (whatever wrote them: vitctl, Orbax, several processes)."""
    import ml_dtypes

    from vitctl.formats.orbax import OrbaxReader

    path = (Path(ckpt) / PARAMS).absolute()
    if JAX not in detect_formats(ckpt):
        raise CheckpointError(f"{ckpt} has no JAX weights ({PARAMS}/)", hint=f"found: {', '.join(detect_formats(ckpt)) or 'none'}")
    expected = jax_param_shapes(cfg)
    dtype = np.dtype(ml_dtypes.bfloat16 if cfg.param_dtype == "bfloat16" else cfg.param_dtype)
    reader = OrbaxReader(path)
    try:
        check_coverage({n: i.shape for n, i in reader.stored().items()}, expected, f"{path}")
        out = {n: np.empty(s, dtype) for n, s in expected.items()}
        for name, a in reader.iter_tensors(list(reader.infos())):
            stacked, i = split_layer(name)
            np.copyto(out[stacked][i, ...] if i is not None else out[name], a, casting="unsafe")
    finally:
        reader.close()
    return out


# torch: model.safetensors (or shards + index).
def save_torch(ckpt: str | Path, state: Mapping[str, np.ndarray], max_shard_bytes: int | None = None) -> Path:
    """Writes ckpt/model.safetensors (or shards + index past max_shard_bytes) from state_dict arrays (numpy; bf16 as ml_dtypes).

    Returns the file written (the index when sharded).
    """
    from vitctl.formats.safetensors import SafetensorsWriter

    specs = [(n, tuple(np.shape(a)), np.asarray(a).dtype) for n, a in state.items()]
    writer = SafetensorsWriter(ckpt, specs, max_shard_bytes, metadata={"format": "pt"})
    _write_all(writer, ((n, np.ascontiguousarray(a)) for n, a in state.items()))  # jax_to_torch returns transposed views
    return Path(ckpt) / writer.files[-1]


def load_torch(ckpt: str | Path, cfg: ViTConfig | None = None) -> dict[str, np.ndarray]:
    """Reads ckpt's safetensors (one file or shards) into numpy arrays; checks names and shapes if `cfg` is given."""
    from vitctl.formats.safetensors import SafetensorsReader

    formats = detect_formats(ckpt)
    if TIMM in formats and cfg is not None:  # (without a config: the arrays as stored, timm's names)
        raise timm_export_error(ckpt, "loading vitctl torch weights")
    if TORCH not in formats and TIMM not in formats:
        raise CheckpointError(f"{ckpt} has no torch weights ({SAFETENSORS})", hint=f"found: {', '.join(detect_formats(ckpt)) or 'none'}")
    reader = SafetensorsReader(ckpt)
    try:
        if cfg is not None:
            check_coverage({n: i.shape for n, i in reader.infos().items()}, torch_param_shapes(cfg), f"{ckpt}")
        return {n: np.array(a) for n, a in reader.iter_tensors(list(reader.infos()))}  # writable copies, not views of the file
    finally:
        reader.close()
