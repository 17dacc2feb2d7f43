"""What every format shares: the reader and writer protocols, tensor infos, stacked-block
names, where a checkpoint's files may lie, and write errors that name file and tensor.

A reader lists its tensors from headers alone (`infos()`: name -> TensorInfo, no data
read), then hands out one tensor at a time (`read(name)`). A writer is built from the full
list of tensors it will receive (names, shapes, dtypes: the plan), so it lays out its files
before any data arrives, then takes one tensor at a time in any order (`write(name, array)`:
any memory layout, e.g. a transposed view, cast to the planned dtype), and `close()` checks
that each was written exactly once. Memory is bounded by one tensor (or one stored chunk),
never by the checkpoint.

Names: the safetensors side uses torch state_dict keys ("torch" naming), the Orbax side
per-layer NNX paths ("jax" naming; stacked blocks per layer, as vitctl.params names them). Shapes and dtypes are numpy's; bfloat16 is
ml_dtypes.bfloat16.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from vitctl import untrusted
from vitctl.errors import CheckpointError, ConfigError
from vitctl.formats import fastcopy

# The files of a checkpoint's weights, named by Hugging Face (safetensors) and by Orbax
# (params/, orbax-checkpoint 0.12.8's StandardCheckpointer). Here, in the light module, so
# that naming a file loads no format's reader.
SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
METADATA, CHECKPOINT_METADATA = "_METADATA", "_CHECKPOINT_METADATA"
# One stored chunk of params/ is at most this many bytes: small enough that a streaming
# reader holds only a few in memory and that one layer slice spans several chunks, which
# tensorstore encodes and decodes on several threads (a 64 MiB layer in one chunk used one:
# 16 MiB chunks read 2.5x and write 1.9x faster with zstd on 2 cores); large enough that
# per-chunk overhead is negligible. ViT-22B's mlp_in, (48, 6144, 24576) in fp32, is stored as
# 48 * 36 chunks of (1, 2048, 2048) = 16 MiB by tensorstore (choose_chunks).
CHUNK_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: enough to plan without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path  # for messages: the file (or Orbax directory) holding the data
    chunk_bytes: int = 0  # bytes a reader must hold to read it, if more than nbytes (Orbax chunks)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Reader(Protocol):
    """A source checkpoint, read one tensor at a time.

    `naming` is "jax" (per-layer NNX paths, `blocks/{i}/q/kernel`, shapes as in
    params.jax_param_shapes(cfg, stacked=False)) or "torch" (state_dict keys).
    """

    naming: str
    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...

    def read(self, name: str) -> np.ndarray: ...

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for each of `names` (all of them, each once), in the reader's preferred order."""
        ...

    def close(self) -> None: ...


def iter_by_name(reader: Reader, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """The default `iter_tensors`: random access, in the order given."""
    for name in names:
        yield name, reader.read(name)


class Writer(Protocol):
    files: list[str]  # what it creates, relative to its directory

    def write(self, name: str, array: np.ndarray) -> None: ...

    def close(self) -> None:
        """Checks that every planned tensor was written once; finishes the files (index, metadata)."""

    def abort(self) -> None:
        """Releases open files after a failure (the caller deletes the directory)."""


Spec = tuple[str, tuple[int, ...], np.dtype]  # what a writer is planned with: (name, shape, dtype)


def parse_size(text: str | int) -> int:
    """ "5GB" -> 5_000_000_000 (decimal units, as Hugging Face), "2GiB" -> 2 * 2**30, "123" -> 123."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(text), re.IGNORECASE)
    unit = m and m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    if not m or unit not in scale or float(m.group(1)) * scale[unit] < 1:
        raise ConfigError(f"invalid size '{text}'", hint='use e.g. "5GB" (10^9 bytes), "500MB", "2GiB" (2^30 bytes) or a byte count')
    return int(float(m.group(1)) * scale[unit])


def nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


# Where a checkpoint's files may lie.
class CheckpointRoot:
    """Where a checkpoint's files may lie: inside its directory, or, for a Hugging Face cache
    snapshot (`.../models--org--name/snapshots/SHA/...`, whose files are symlinks), inside that
    repo's cache folder too. A file that is a symlink leading elsewhere is refused: a checkpoint
    from a stranger must not make vitctl read (and copy into an output, or upload) other files."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.also = hf_cache_repo(self.path)

    def check(self, path: str | Path, where: str | None = None) -> Path:
        """`path` itself, after checking that it resolves inside the checkpoint."""
        untrusted.inside(self.path, path, where or str(self.path), also=self.also)
        return Path(path)

    def member(self, folder: str | Path, name: Any, where: str, kind: str = "the file") -> Path:
        """folder / name for a `name` read from a file (index, manifest): a checked relative name, inside the checkpoint."""
        path = Path(folder) / untrusted.check_name(name, where, kind=kind)
        return self.check(path, where)

    def check_tree(self, folder: str | Path, where: str) -> None:
        """Every symlink under `folder` (not followed) leads inside the checkpoint. Metadata only: a
        scandir per directory, a resolve per symlink, so a 22B checkpoint's thousands of chunk files
        cost milliseconds."""
        pending = [Path(folder)]
        while pending:
            try:
                entries = list(os.scandir(pending.pop()))
            except OSError:
                continue  # a missing or unreadable folder: the reader names it
            for e in entries:
                if e.is_symlink():
                    self.check(e.path, where)
                elif e.is_dir(follow_symlinks=False):
                    pending.append(Path(e.path))


def hf_cache_repo(path: Path) -> Path | None:
    """The blob folder `.../models--org--name/blobs` of the Hugging Face cache snapshot that holds
    `path` (`.../models--org--name/snapshots/SHA/...`), else None."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")) and i + 1 < len(parts):
            return Path(*parts[:i]) / "blobs"
    return None


def hf_snapshot(path: str | Path) -> str | None:
    """ "org/name@SHA" for a path in a Hugging Face cache snapshot of a model
    (`.../models--org--name/snapshots/SHA[/...]`), else None."""
    parts = Path(path).parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and "--" in parts[i - 1][8:]:
            return f"{parts[i - 1][8:].replace('--', '/', 1)}@{parts[i + 1]}"
    return None


# Write failures, named by file and tensor.
T = TypeVar("T")


def guarded(path: Path, what: str, fn: Callable[[], T]) -> T:
    """Runs a write; turns an OSError (disk full, file too large, ...) into a CheckpointError naming file and tensor."""
    try:
        return fn()
    except OSError as e:
        raise write_error(path, what, e) from None


def block_writes(fn: Callable[[], Any]) -> None:
    """Runs fn (queueing or flushing fastcopy.BlockWriter writes labelled (path, what)); a failed
    write becomes a CheckpointError naming its file and tensor."""
    try:
        fn()
    except fastcopy.WriteFailed as e:
        path, what = e.label
        raise write_error(path, what, e.error) from None


def write_error(path: Path, what: str, e: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot write {what} to {path}: {e.strerror or e}", hint="check the free disk space and the file size limit (ulimit -f)"
    )
