"""Orbax params/: the JAX checkpoint, one array (or one layer of a stacked array) at a time.

params/ holds the parameters as Orbax's StandardCheckpointer stores a nested dict of numpy
arrays: one zarr array per leaf (named by its '.'-joined keys), `_METADATA` (the tree) and
`_CHECKPOINT_METADATA`; the arrays lie in one OCDBT database (`use_ocdbt`, Orbax's default)
or one directory each. Stacked block arrays (`blocks/q/kernel`, leading L axis) are exposed
and written per layer (`blocks/{i}/q/kernel`): a layer is a slice `[i]`, which touches only
that layer's chunks.

- OrbaxReader: follows `_METADATA` (OCDBT or per-array, zarr v2 or zarr3), checking every
  name and every array's metadata before tensorstore sees it. Uncompressed zarr v2 arrays
  (what vitctl writes) are read without tensorstore's decoder (vitctl.formats.zarr): where
  each chunk lies comes from the OCDBT B-tree (tensorstore.ocdbt.dump) or is a chunk file.
  Other arrays are decoded by tensorstore straight into their output array (fastcopy.scratch),
  a few tensors ahead.
- OrbaxWriter: params/ written directly, one layer slice at a time. Orbax's own `save` needs
  the whole pytree in memory; its experimental partial save adds whole leaves only, so a
  stacked (L, ...) array would still be one allocation. Uncompressed per-array output (what
  `vitctl convert` writes) goes to plain files through fastcopy.BlockWriter; an OCDBT
  database or zstd chunks (Orbax's defaults) are written by tensorstore. Orbax restores each
  with `ocp.StandardCheckpointer`.

Imports numpy, ml_dtypes and tensorstore (on first use) only: no jax, no orbax.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import json
import math
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitctl import untrusted
from vitctl.errors import CheckpointError, MissingDependencyError
from vitctl.formats import fastcopy
from vitctl.formats.base import CHECKPOINT_METADATA, METADATA, CheckpointRoot, Spec, TensorInfo, block_writes, guarded, nbytes
from vitctl.formats.fastcopy import scratch
from vitctl.formats.zarr import (
    RECREATE,
    ZARR_NAMES,
    Location,
    OpenFiles,
    PlainArray,
    array_metadata,
    choose_chunks,
    chunk_file_tally,
    chunk_files,
    chunk_runs,
    slab_chunks,
    stored_chunks,
)
from vitctl.params import is_stacked, layer_name, split_layer

ORBAX_HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
OCDBT_CONFIG = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "manifest_kind": "single"}


def _tensorstore():
    try:
        import tensorstore as ts
    except ImportError as e:
        raise MissingDependencyError(f"JAX checkpoints (Orbax params/) need tensorstore ({e})", hint="pip install 'vitctl[jax]'") from None
    return ts


def _ts_context(ts):
    # No data cache (each chunk is read once); a small one for OCDBT B-tree nodes (Orbax: 100 MB).
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}, "cache_pool#ocdbt": {"total_bytes_limit": 8 * 2**20}})


def _kvstore(params: Path, array: str, ocdbt: bool, writing: bool = False) -> dict[str, Any]:
    """The tensorstore kvstore spec of one array in params/ (Orbax names arrays by '.'-joined keys)."""
    if not ocdbt:
        return {"driver": "file", "path": f"{params}/{array}/"}
    spec: dict[str, Any] = {
        "driver": "ocdbt",
        "base": {"driver": "file", "path": f"{params}/"},
        "path": array,
        "cache_pool": "cache_pool#ocdbt",
    }
    if writing:  # as Orbax: non-atomic data files (fresh names), atomic manifest, one writer
        spec.update(
            base={"driver": "file", "path": f"{params}/", "file_io_locking": {"mode": "non_atomic"}},
            manifest={"driver": "file", "path": f"{params}/"},
            config=OCDBT_CONFIG, assume_config=True, target_data_file_size=2**31,
        )  # fmt: skip
    return spec


def _ts_error(params: Path, what: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot read {what} from {params}: {str(e)[:500]}", hint="the Orbax checkpoint is corrupt or incomplete: re-create it"
    )


class OrbaxReader:
    """params/ of a JAX checkpoint, one array (or one layer of a stacked array) at a time."""

    naming = "jax"

    def __init__(self, params: str | Path):
        ts = self._ts = _tensorstore()
        self.path = Path(params).absolute()
        # Everything below comes from files a stranger may have written: the checkpoint's files
        # must lie inside it, and every array's metadata is checked here, before tensorstore
        # sees it (a chunk shape larger than the array, or a shape past what is stored, made
        # tensorstore allocate without bound and abort the process).
        root = CheckpointRoot(self.path.parent)
        root.check(self.path)
        root.check_tree(self.path, str(self.path))
        meta = _read_orbax_metadata(self.path)
        ctx = _ts_context(ts)
        driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._arrays: dict[str, Any] = {}  # arrays tensorstore reads
        self._plain: dict[str, PlainArray] = {}  # arrays read straight from their files
        self._open_files = OpenFiles()
        self._reading: set[concurrent.futures.Future] = set()
        self._stacked: dict[str, TensorInfo] = {}  # as stored: block arrays with their leading L axis
        self._infos: dict[str, TensorInfo] | None = None  # per layer, listed on first use
        self._specs: dict[str, dict[str, Any]] = {}  # tensorstore specs of every array (slice reads open them on first use)
        self._ctx = ctx
        ocdbt, zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
        names = _orbax_names(self.path, meta)
        index = _ocdbt_index(ts, self.path, ctx, f"array '{next(iter(names), '')}'") if ocdbt else None
        tallies = stored_chunks(index) if index is not None else None
        every_chunk_stored = meta.get("store_array_data_equal_to_fill_value") is True
        for name, stored in names.items():
            tally = tallies.get(stored, (0, 0)) if tallies is not None else chunk_file_tally(self.path / stored)
            z = array_metadata(self.path, stored, name, zarr3, index, tally, every_chunk_stored)
            plain = (
                None if zarr3 else self._plain_array(z, stored, index) if ocdbt else PlainArray.parse(z, chunk_files(self.path / stored))
            )
            self._specs[name] = {"driver": driver, "kvstore": _kvstore(self.path, stored, ocdbt)}
            if plain is not None and (plain.chunks[:1] == (1,) or not is_stacked(name)):
                self._plain[name] = plain
                self._add_info(name, plain.shape, plain.dtype, nbytes(plain.chunks, plain.dtype))
                continue
            spec = {"driver": driver, "kvstore": _kvstore(self.path, stored, ocdbt)}
            try:
                arr = ts.open(spec, open=True, read=True, write=False, context=ctx).result()
                dtype, chunks = np.dtype(arr.dtype.numpy_dtype), tuple(arr.chunk_layout.read_chunk.shape)
            except Exception as e:  # noqa: BLE001  (tensorstore maps its status codes to several exception types)
                raise _ts_error(self.path, f"array '{name}'", e) from None
            self._arrays[name] = arr
            self._add_info(name, tuple(arr.shape), dtype, nbytes(chunks, dtype))

    def _plain_array(self, z: Mapping[str, Any], stored: str, index: Mapping[str, Location]) -> PlainArray | None:
        """An array of the OCDBT database whose chunks are all stored, uncompressed (else None)."""
        plain = PlainArray.parse(z, lambda key: index.get(f"{stored}/{key}"))
        return plain if plain is not None and all(f"{stored}/{k}" in index for k in plain.chunk_keys()) else None

    def _add_info(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk_bytes: int) -> None:
        if is_stacked(name) and not shape:
            raise CheckpointError(f"stacked block array '{name}' in {self.path} is a scalar; expected a leading layer axis")
        self._stacked[name] = TensorInfo(name, shape, dtype, self.path, chunk_bytes)

    def stored(self) -> dict[str, TensorInfo]:
        """The arrays as stored, block arrays with their leading L axis (`blocks/q/kernel`)."""
        return dict(self._stacked)

    def count(self) -> int:
        """How many per-layer tensors `infos()` lists, without listing them."""
        return sum(i.shape[0] if is_stacked(n) else 1 for n, i in self._stacked.items())

    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            self._infos = {}
            for name, info in self._stacked.items():
                if not is_stacked(name):
                    self._infos[name] = info
                    continue
                for i in range(info.shape[0]):
                    self._infos[layer_name(name, i)] = TensorInfo(
                        layer_name(name, i), info.shape[1:], info.dtype, self.path, info.chunk_bytes
                    )
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        return self._finish(name, self._start(name))

    read_ahead = 2  # tensors tensorstore reads and decodes while the caller works on the current one

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """In the order given, reading `read_ahead` tensors ahead: tensorstore decodes them while the caller works."""
        ahead: collections.deque[tuple[str, Any]] = collections.deque()
        for name in names:
            ahead.append((name, self._start(name)))
            if len(ahead) > self.read_ahead:
                yield ahead[0][0], self._finish(*ahead.popleft())
        while ahead:
            yield ahead[0][0], self._finish(*ahead.popleft())

    def _start(self, name: str):
        stacked, i = split_layer(name)
        key = stacked if i is not None else name
        if self._infos is None:
            self.infos()
        if key in self._plain:  # read straight from the files, on the reader thread
            future = _reader_thread().submit(self._plain[key].read, i, name, self._open_files)
            self._reading.add(future)
            future.add_done_callback(self._reading.discard)
            return None, future
        arr = self._arrays[stacked] if i is not None else self._arrays[name]
        src = arr[i] if i is not None else arr
        info = self._infos[name]
        # Decoded straight into the output array: no copy after decoding.
        out = scratch(info.shape, info.dtype)
        try:
            future = self._ts.array(out, copy=False, write=True).write(src).commit
        except Exception as e:  # noqa: BLE001  (as below)
            raise _ts_error(self.path, f"tensor '{name}'", e) from None
        future.force()  # tensorstore futures are lazy: start reading and decoding now
        return out, future

    def read_slice(self, name: str, index: tuple[slice | int, ...]) -> np.ndarray:
        """`tensor[index]` of one tensor (per-layer name: a slice of that layer), read by tensorstore,
        which fetches and decodes only the stored chunks the slice touches."""
        stacked, i = split_layer(name)
        key = stacked if i is not None else name
        if self._infos is None:
            self.infos()
        if name not in self._infos:
            raise KeyError(name)
        # numpy's meaning of each slice (ends past the shape clipped), which tensorstore does not apply itself
        index = tuple(slice(*s.indices(n)) if isinstance(s, slice) else s for s, n in zip(index, self._infos[name].shape))
        arr = self._arrays.get(key)
        try:
            if arr is None:
                arr = self._arrays[key] = self._ts.open(self._specs[key], open=True, read=True, write=False, context=self._ctx).result()
            src = arr[i] if i is not None else arr
            return np.asarray(src[index].read().result())
        except Exception as e:  # noqa: BLE001  (tensorstore maps its status codes to several exception types)
            raise _ts_error(self.path, f"a slice of tensor '{name}'", e) from None

    def _finish(self, name: str, started) -> np.ndarray:
        out, future = started
        try:
            result = future.result()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (as above)
            raise _ts_error(self.path, f"tensor '{name}'", e) from None
        return result if out is None else out

    def close(self) -> None:
        concurrent.futures.wait(list(self._reading))  # reads still running use the open files
        self._arrays.clear()
        self._plain.clear()
        self._open_files.close()


@functools.cache
def _reader_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vitctl-read")


# The OCDBT B-tree, listed with tensorstore.ocdbt.dump: where each chunk lies in the data files.
_VALUE_REF = re.compile(r"value:([^:]*):([^:]*):([0-9]+):([0-9]+)")
_NODE_REF = re.compile(r"btreenode:([^:]*):([^:]*):([0-9]+):([0-9]+)")


def _data_file(params: Path, ref: str, pattern: re.Pattern, what: str) -> Path:
    """The file an OCDBT reference (`value:` or `btreenode:` base:path:offset:length) names, checked
    to be a plain relative name inside params/: the references come from the database's own files."""
    m = pattern.fullmatch(ref)
    if m is None:
        raise CheckpointError(f"{params}: the OCDBT database holds an unreadable {what} reference {ref[:200]!r}", hint=RECREATE)
    base = urllib.parse.unquote(m.group(1))
    rel = (base if not base or base.endswith("/") else base + "/") + urllib.parse.unquote(m.group(2))
    return params / untrusted.check_name(rel, f"the OCDBT database in {params} ({what} reference)")


def _ocdbt_index(ts, params: Path, context, what: str) -> dict[str, Location]:
    """Every key of the OCDBT database in `params/` (latest version) -> where its value lies, from its
    B+tree as tensorstore.ocdbt.dump decodes it. Every node and value it references must be a file
    inside params/ (refused otherwise, before tensorstore reads any of them)."""
    try:
        base = ts.KvStore.open({"driver": "file", "path": f"{params}/"}, context=context).result()
        manifest = ts.ocdbt.dump(base, context=context).result()
        root = max(manifest["versions"], key=lambda v: v["generation_number"])["root"]
    except Exception as e:  # noqa: BLE001  (tensorstore maps its status codes to several exception types)
        raise _ts_error(params, what, e) from None  # (tensorstore's message names the manifest)
    pending = [root["location"]] if "location" in root else []
    index: dict[str, Location] = {}
    while pending:
        location = pending.pop()
        _data_file(params, location, _NODE_REF, "node")
        try:
            entries = ts.ocdbt.dump(base, location, context=context).result()["entries"]
        except Exception as e:  # noqa: BLE001  (as above)
            raise _ts_error(params, what, e) from None
        for entry in entries:
            if "location" in entry:  # interior node: a subtree
                pending.append(entry["location"])
                continue
            key = bytes(entry["key"]).decode(errors="replace")
            if "inline_value" in entry:
                index[key] = bytes(entry["inline_value"])
                continue
            m = _VALUE_REF.fullmatch(entry.get("indirect_value", ""))
            index[key] = (_data_file(params, entry.get("indirect_value", ""), _VALUE_REF, "value"), int(m.group(3)), int(m.group(4)))
    return index


def _read_orbax_metadata(params: Path) -> dict[str, Any]:
    path = params / METADATA
    if not path.is_file():
        raise CheckpointError(f"cannot read {path}: no such file", hint="params/ is not a complete Orbax checkpoint: re-create it")
    try:
        meta = untrusted.read_json(path)
    except CheckpointError as e:
        raise CheckpointError(f"cannot read {path}: {e.message}", hint="params/ is not a complete Orbax checkpoint: re-create it") from None
    if not isinstance(meta.get("tree_metadata"), dict):
        raise CheckpointError(
            f"cannot read {path}: it has no tree_metadata object", hint="params/ is not a complete Orbax checkpoint: re-create it"
        )
    return meta


def _orbax_names(params: Path, meta: Mapping[str, Any]) -> dict[str, str]:
    """{"/"-joined tree path: Orbax's stored array name ('.'-joined keys)} from _METADATA.

    The stored name is a directory (or an OCDBT key prefix) under params/, so every key must be
    one plain path segment: no '/', no '..', nothing that leads out of params/."""
    out = {}
    where = f"{params / METADATA}"
    for key, entry in meta["tree_metadata"].items():
        try:
            keys = [k["key"] for k in entry["key_metadata"]]
        except (KeyError, TypeError):
            raise CheckpointError(f"cannot read {where}: entry {str(key)[:200]!r} has no key_metadata") from None
        for k in keys:
            if not isinstance(k, str | int) or isinstance(k, bool) or "/" in str(k):
                raise CheckpointError(
                    f"{where} names the tree key {str(k)[:200]!r}, which vitctl refuses: a key must be one plain name",
                    hint="the checkpoint is damaged or hostile: do not use it",
                )
        keys = [untrusted.check_name(str(k), where, kind="the tree key") for k in keys]
        stored = ".".join(keys)
        untrusted.check_name(stored, where)
        out["/".join(keys)] = stored
    return out


class OrbaxWriter:
    """Writes params/ in Orbax's layout, one array or one layer slice at a time.

    Uncompressed with one directory per array (`compress=False, use_ocdbt=False`: what `vitctl
    convert` writes), chunks are runs of C-order bytes (slab_chunks), written as plain files:
    `params/<dotted name>/.zarray` and one file per chunk, which a tensor's bytes reach block by
    block through a fastcopy.BlockWriter (laid out here, written by its thread, os.pwrite 512 KiB
    at a time). tensorstore's OCDBT writer hands the kernel 16 MiB+ writes, each copied into large
    page-cache folios (2-4x the CPU of small writes), and copies every tensor into its own buffers
    first. OrbaxReader maps these chunks back without a copy.

    Otherwise tensorstore writes (zarr v2, chunks cut as Orbax's subchunking: choose_chunks):
    `write` returns once tensorstore has copied the tensor; compression and storage run in the
    background, at most `max_inflight` tensors behind (memory: that many copies, plus their
    compressed bytes).

    Args:
        params: the params/ directory to create (its parent must exist).
        specs: every per-layer (name, shape, dtype) that will be written; `blocks/{i}/x`
            for i < L become slice i of the stacked array `blocks/x` with shape (L, ...).
        chunk_bytes: the largest stored chunk (CHUNK_BYTES).
        compress: zstd level 1 on each chunk (Orbax's default).
        use_ocdbt: all arrays in one OCDBT database (Orbax's default), else one directory each.
    """

    max_inflight = 1  # 2 is ~10% faster on 2 cores but holds ~1.5 more tensors

    def __init__(self, params: str | Path, specs: Sequence[Spec], chunk_bytes: int, compress: bool = True, use_ocdbt: bool = True):
        self.path = Path(params).absolute()
        self.files = [self.path.name + "/"]
        self.use_ocdbt = use_ocdbt
        guarded(self.path, "the directory", self.path.mkdir)
        self._pending: set[str] = {n for n, _, _ in specs}
        self._arrays = _stack_specs(specs)  # {stored array: (shape, dtype)}
        self._chunks: dict[str, tuple[int, ...]] = {}
        self._stores: dict[str, Any] = {}  # tensorstore's open arrays
        self._inflight: collections.deque[tuple[str, Any]] = collections.deque()
        self._blocks: fastcopy.BlockWriter | None = None
        if compress or use_ocdbt:
            self._open_stores(chunk_bytes, compress)
        else:
            self._make_folders(chunk_bytes)
            self._blocks = fastcopy.BlockWriter()

    def _make_folders(self, chunk_bytes: int) -> None:
        for name, (shape, dtype) in self._arrays.items():
            chunks = self._chunks[name] = slab_chunks(shape, dtype.itemsize, chunk_bytes, is_stacked(name))
            zarray = {
                "chunks": list(chunks), "compressor": None, "dimension_separator": ".", "dtype": ZARR_NAMES.get(dtype, dtype.str),
                "fill_value": None, "filters": None, "order": "C", "shape": list(shape), "zarr_format": 2,
            }  # fmt: skip
            folder = self.path / name.replace("/", ".")
            guarded(folder, "the array metadata", lambda f=folder, z=zarray: (f.mkdir(), (f / ".zarray").write_text(json.dumps(z))))

    def _open_stores(self, chunk_bytes: int, compress: bool) -> None:
        ts = _tensorstore()
        # No fsync per chunk (as cp): the checkpoint becomes visible only by the final rename.
        # No B-tree node cache: every commit adds a version, and cached nodes grew RSS with the
        # number of tensors written (by ~60 MiB over 1,000 tensors), for no speed gain.
        ctx = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 0}, "file_io_sync": False})
        opening = []
        try:
            for name, (shape, dtype) in self._arrays.items():
                chunks = choose_chunks(shape, dtype.itemsize, chunk_bytes, is_stacked(name))
                spec = {
                    "driver": "zarr", "dtype": dtype.name,
                    "kvstore": _kvstore(self.path, name.replace("/", "."), ocdbt=self.use_ocdbt, writing=True),
                    "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": {"id": "zstd", "level": 1} if compress else None},
                }  # fmt: skip
                opening.append(ts.open(spec, create=True, context=ctx))
                self._stores[name] = self._ts_call(f"array '{name}'", opening[-1].result)
        except BaseException:
            # An open that Ctrl-C or SIGTERM interrupted goes on creating its metadata in the
            # background: wait for it, so that nothing lands after the caller deletes the directory.
            _settle(opening)
            raise

    def _ts_call(self, what: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (tensorstore reports write failures, disk full or EFBIG, as ValueError and others)
            raise CheckpointError(
                f"cannot write {what} to {self.path}: {str(e)[:500]}", hint="check the free disk space and the file size limit (ulimit -f)"
            ) from None

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes `array` (any memory layout, cast to the planned dtype) as tensor `name`."""
        assert name in self._pending, f"'{name}' written twice or not planned"
        stacked, i = split_layer(name)
        key = stacked if i is not None else name
        shape, _ = self._arrays[key]
        assert (shape[1:] if i is not None else shape) == array.shape, (name, array.shape, shape)
        if self._blocks is not None:
            self._write_files(name, key, i, array)
        else:
            self._write_store(name, key, i, array)
        self._pending.discard(name)

    def _write_files(self, name: str, key: str, i: int | None, array: np.ndarray) -> None:
        shape, dtype = self._arrays[key]
        folder = self.path / key.replace("/", ".")
        runs = chunk_runs(shape, self._chunks[key], dtype.itemsize)
        if i is not None:  # this layer's runs, from the start of the layer
            layer = math.prod(shape[1:]) * dtype.itemsize
            runs = [(k, a - i * layer, b - i * layer) for k, a, b in runs if i * layer <= a < (i + 1) * layer]
        segments, label = [], (folder, f"tensor '{name}'")
        try:
            for k, a, b in runs:
                fd = guarded(folder / k, f"tensor '{name}'", lambda p=folder / k: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
                segments.append((a, b, fd, 0))
            if array.size:
                block_writes(lambda: self._blocks.write_segments(segments, array, dtype, label))
        finally:
            for _, _, fd, _ in segments:
                self._blocks.close_file(fd, label)

    def _write_store(self, name: str, key: str, i: int | None, array: np.ndarray) -> None:
        target = self._stores[key][i] if i is not None else self._stores[key]
        array = fastcopy.contiguous(array, np.dtype(target.dtype.numpy_dtype))  # any layout in; the planned dtype out
        futures = self._ts_call(f"tensor '{name}'", lambda: target.write(array))
        self._inflight.append((name, futures.commit))  # first: abort() must wait for it whatever interrupts us below
        self._ts_call(f"tensor '{name}'", futures.copy.result)  # `array` may be dropped from here on
        futures.commit.force()  # lazy until forced: start compressing and storing now
        while len(self._inflight) > self.max_inflight:  # compress and store in the background, a few tensors deep
            done, commit = self._inflight.popleft()
            self._ts_call(f"tensor '{done}'", commit.result)

    def close(self) -> None:
        """Checks that every planned tensor was written, waits for the writes, then writes Orbax's metadata."""
        assert not self._pending, f"tensors never written: {sorted(self._pending)[:8]}"
        if self._blocks is not None:
            block_writes(self._blocks.close)
        while self._inflight:
            done, commit = self._inflight.popleft()
            self._ts_call(f"tensor '{done}'", commit.result)
        self._stores.clear()
        _write_orbax_metadata(self.path, sorted(self._arrays), use_ocdbt=self.use_ocdbt)

    def abort(self) -> None:
        """Stops every background write: none lands after this returns (the caller deletes the directory)."""
        if self._blocks is not None:
            self._blocks.abort()
        _settle([commit for _, commit in self._inflight])
        self._inflight.clear()
        self._stores.clear()


def _settle(futures: Sequence[Any]) -> None:
    """Waits for tensorstore futures to finish, whatever their outcome. Not cancel(): a
    cancelled future returns before its write stops."""
    for future in futures:
        with contextlib.suppress(Exception):
            if hasattr(future, "force"):
                future.force()
            future.result()


def _write_orbax_metadata(path: Path, names: Iterable[str], use_ocdbt: bool) -> None:
    """params/_METADATA (the tree: dict keys, numpy leaves) and _CHECKPOINT_METADATA, as Orbax writes them."""
    tree = {str(tuple(name.split("/"))): _tree_entry(name) for name in names}
    meta = {
        "tree_metadata": tree,
        "use_ocdbt": use_ocdbt,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }
    now = time.time_ns()
    ckpt_meta = {
        "item_handlers": ORBAX_HANDLER,
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now,
        "custom_metadata": {},
    }
    guarded(path / METADATA, "the Orbax metadata", lambda: (path / METADATA).write_text(json.dumps(meta)))
    guarded(path / CHECKPOINT_METADATA, "the Orbax metadata", lambda: (path / CHECKPOINT_METADATA).write_text(json.dumps(ckpt_meta)))


def _tree_entry(name: str) -> dict[str, Any]:
    """One _METADATA entry: the dict keys of the path (key_type 2) and a numpy leaf."""
    keys = [{"key": k, "key_type": 2} for k in name.split("/")]
    return {"key_metadata": keys, "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}


def _stack_specs(specs: Iterable[Spec]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-layer specs -> {array name: (shape, dtype)}, block layers stacked along a new leading axis."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    layers: dict[str, dict[int, tuple[tuple[int, ...], np.dtype]]] = {}
    for name, shape, dtype in specs:
        stacked, i = split_layer(name)
        if i is None:
            out[name] = (tuple(shape), np.dtype(dtype))
        else:
            layers.setdefault(stacked, {})[i] = (tuple(shape), np.dtype(dtype))
    for name, per_layer in layers.items():
        if sorted(per_layer) != list(range(len(per_layer))) or len(set(per_layer.values())) != 1:
            raise CheckpointError(
                f"cannot stack {name}: layers {sorted(per_layer)} with shapes/dtypes {sorted(set(map(str, per_layer.values())))}"
            )
        shape, dtype = per_layer[0]
        out[name] = ((len(per_layer), *shape), dtype)
    return out
