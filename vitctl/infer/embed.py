"""vitctl embed: a checkpoint's features of every image of a split, streamed to one file.

- Features: `stream_features` runs the model over a split in order (data.pipeline.eval_batches,
  the config's resize and value mapping, no augmentation) and yields one batch of features at a
  time. `vitctl probe` extracts through the same function, so an embedding file holds exactly
  the features a probe of the same checkpoint, data, layer and pooling fits on (one backend:
  bit for bit). --layer and --pool as infer.runner.resolve_features.
- Ids: a record's `describe(i)` with the data's own location dropped: a path inside the data
  root (an ImageFolder's "cat/001.png", a packed shard's "test-00000-of-00001.array_record
  record 5"), else the data's final name component in front ("digits (test) example 17",
  "photos.npz (test) example 3"). Never an absolute local path. Built-in and array sources count
  examples within the split as vitctl splits them (test_fraction, split_seed: in the settings).
- Labels: int32, the source's class index of each example.
- Files, by the output's suffix (D the feature width, N the examples):
    .safetensors  tensors "embeddings" F32 [N, D], "labels" I32 [N], and the ids as UTF-8 bytes
                  "ids" U8 [total] with "id_offsets" I64 [N + 1] (id i is ids[off[i]:off[i + 1]]):
                  bounded whatever N, where ids in the string metadata would grow the JSON header
                  without limit. Metadata {"vitctl": settings as JSON}.
    .npy          one structured array [N] with fields embedding <f4 (D,), label <i4, id |S<L>
                  (UTF-8, L the longest id rounded up to 4 bytes, so every row's embedding is
                  4-byte aligned): np.load(FILE)["embedding"] is the [N, D] matrix, one file,
                  no pickle (np.load(allow_pickle=False) reads it). No room for the settings.
    .parquet      columns id (string), label (int32), embedding (fixed_size_list<float32>[D]),
                  row groups of ~32 MiB of embeddings; schema metadata {"vitctl": settings}.
- Bounded memory: a batch (parquet: a row group) is held at a time. N and D are known before the
  first batch (D is the model's width), so the .npy and .safetensors headers go first and rows
  follow as batches arrive; ids are measured by a first pass over `describe` (no image is read).
- Safe output: refused before any work if the file exists, its directory does not, or the disk
  has less free space than the file needs; written to a temporary beside it and renamed when
  complete (checkpoint.atomic_file): an error or an interrupt leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import vitctl
from vitctl.config import ViTConfig
from vitctl.errors import ConfigError, DataError, MissingDependencyError, OutputError
from vitctl.infer.runner import Features, Outputs, default_backend, make_runner, one_blas_thread, resolve_features

FORMATS = {".safetensors": "safetensors", ".npy": "npy", ".parquet": "parquet"}
SPLITS = ("train", "test", "all")
BUILT_IN = ("digits", "fashion-mnist")  # data sets vitctl names (data.sources)
ROW_GROUP_BYTES = 32 * 2**20  # parquet: embeddings per row group (large enough to scan fast, small enough to hold)
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not one vitctl wrote


class FeatureBatch(NamedTuple):
    """One batch of a split's features, in order: rows start .. start + len(labels) - 1."""

    features: np.ndarray  # float32 [b, D]
    labels: np.ndarray  # int32 [b]
    start: int


def stream_features(
    runner: Callable[[np.ndarray], Outputs], records, cfg: ViTConfig, batch_size: int, *, pad: bool, workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[FeatureBatch]:  # fmt: skip
    """The features of every example of a Records, in order, a batch at a time (see the module docstring).

    Args:
        runner: infer.runner.make_runner(..., feats, logits=False).
        pad: run the padded last batch whole (JAX: one shape, one compile), else only its real rows.
        on_batch: called with the batch's number of examples once the consumer has taken it.
    """
    from vitctl.data.pipeline import eval_batches

    # The classifier head is not run: data with more classes than the model has is fine here.
    cfg = dataclasses.replace(cfg, num_classes=0)
    start = 0
    with contextlib.closing(eval_batches(records, cfg, batch_size, workers=workers)) as batches:
        for x, y, valid in batches:
            k = int(valid.sum())
            assert valid[:k].all(), "eval_batches pads only the end of the last batch"
            features = np.asarray(runner(x if pad else x[:k]).features, np.float32)[:k]
            yield FeatureBatch(features, np.array(y[:k], np.int32), start)  # a copy: a view would keep grain's shared memory alive
            start += k
            if on_batch:
                on_batch(k)


def record_id(records, i: int) -> str:
    """Example i's id: its describe(i), the data's location made relative (see the module docstring)."""
    text = records.describe(i)
    for root in dict.fromkeys((str(Path(records.name)), records.name)):
        if text.startswith(root + os.sep):
            return text[len(root) + 1 :]
        if text.startswith(root + " "):
            return Path(root).name + text[len(root) :]
    return text


# Writers: header first (N, D and the ids' sizes known), then rows in order; close() checks every row came.
class IdSizes(NamedTuple):
    total: int  # UTF-8 bytes of all ids
    longest: int


def _write_at(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class SafetensorsRows:
    """embeddings, labels, id_offsets, ids: each tensor's region filled as rows arrive (pwrite at its offset)."""

    def __init__(self, path: Path, n: int, d: int, ids: IdSizes, settings: dict[str, Any]):
        specs = (("embeddings", "F32", [n, d], 4 * n * d), ("labels", "I32", [n], 4 * n),
                 ("id_offsets", "I64", [n + 1], 8 * (n + 1)), ("ids", "U8", [ids.total], ids.total))  # fmt: skip
        header: dict[str, Any] = {"__metadata__": {"vitctl": json.dumps(settings, sort_keys=True)}}
        pos = 0
        for name, dtype, shape, size in specs:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
            pos += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self.at = {name: 8 + len(text) + header[name]["data_offsets"][0] for name, *_ in specs}
        self.n, self.d, self.rows, self.id_pos, self.ids = n, d, 0, 0, ids
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close/abort)
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.file.flush()

    def write(self, ids: Sequence[str], labels: np.ndarray, features: np.ndarray) -> None:
        fd, k = self.file.fileno(), len(ids)
        encoded = [s.encode() for s in ids]
        offsets = self.id_pos + np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        _write_at(fd, features.astype("<f4"), self.at["embeddings"] + 4 * self.d * self.rows)
        _write_at(fd, labels.astype("<i4"), self.at["labels"] + 4 * self.rows)
        _write_at(fd, offsets[:-1].astype("<i8"), self.at["id_offsets"] + 8 * self.rows)
        _write_at(fd, np.frombuffer(b"".join(encoded), np.uint8), self.at["ids"] + self.id_pos)
        self.rows, self.id_pos = self.rows + k, int(offsets[-1])

    def close(self) -> None:
        assert (self.rows, self.id_pos) == (self.n, self.ids.total), (self.rows, self.n, self.id_pos, self.ids)
        _write_at(self.file.fileno(), np.array([self.id_pos], "<i8"), self.at["id_offsets"] + 8 * self.n)
        self.file.close()

    def abort(self) -> None:
        self.file.close()


class NpyRows:
    """A structured .npy: the header, then each batch's rows appended."""

    def __init__(self, path: Path, n: int, d: int, ids: IdSizes, settings: dict[str, Any]):
        self.dtype = np.dtype([("embedding", "<f4", (d,)), ("label", "<i4"), ("id", f"S{max(4, -(-ids.longest // 4) * 4)}")])
        self.n, self.rows = n, 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close/abort)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def write(self, ids: Sequence[str], labels: np.ndarray, features: np.ndarray) -> None:
        rows = np.empty(len(ids), self.dtype)
        rows["embedding"], rows["label"], rows["id"] = features, labels, [s.encode() for s in ids]
        self.file.write(rows.data)
        self.rows += len(ids)

    def close(self) -> None:
        assert self.rows == self.n, (self.rows, self.n)
        self.file.close()

    def abort(self) -> None:
        self.file.close()


class ParquetRows:
    """pyarrow's ParquetWriter, a row group per ROW_GROUP_BYTES of embeddings."""

    def __init__(self, path: Path, n: int, d: int, ids: IdSizes, settings: dict[str, Any]):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MissingDependencyError(
                f"writing .parquet needs pyarrow ({e})", hint="pip install pyarrow, or write .npy or .safetensors"
            ) from None
        self.pa, self.n, self.d, self.rows = pa, n, d, 0
        self.schema = pa.schema([("id", pa.string()), ("label", pa.int32()), ("embedding", pa.list_(pa.float32(), d))])
        self.schema = self.schema.with_metadata({"vitctl": json.dumps(settings, sort_keys=True)})
        self.group_rows = max(1, ROW_GROUP_BYTES // (4 * d))
        self.pending: list = []
        self.writer = pq.ParquetWriter(path, self.schema)

    def write(self, ids: Sequence[str], labels: np.ndarray, features: np.ndarray) -> None:
        pa = self.pa
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(features, np.float32).reshape(-1)), self.d)
        self.pending.append(pa.table([pa.array(ids, pa.string()), pa.array(labels, pa.int32()), embedding], schema=self.schema))
        self.rows += len(ids)
        if sum(len(t) for t in self.pending) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            group = self.pa.concat_tables(self.pending)
            self.pending = []
            self.writer.write_table(group, row_group_size=len(group))

    def close(self) -> None:
        assert self.rows == self.n, (self.rows, self.n)
        self._flush()
        self.writer.close()

    def abort(self) -> None:
        self.pending = []
        with contextlib.suppress(Exception):  # the file is deleted anyway; the error that led here is the one to show
            self.writer.close()


WRITERS = {"safetensors": SafetensorsRows, "npy": NpyRows, "parquet": ParquetRows}


def output_format(out: str | Path) -> str:
    """The file format of `out`, from its suffix."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out {out}: unknown file type '{Path(out).suffix}'", hint=f"name the file *{', *'.join(FORMATS)}")
    return fmt


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}", hint="check the free space and permissions of the directory") from None


def write_rows(fmt: str, path: Path, n: int, d: int, ids: IdSizes, settings: dict[str, Any], batches: Iterator[tuple]) -> None:
    """Writes (ids, labels, features) batches, N rows in all, to `path` in `fmt`; an OSError in writing is an OutputError naming the file."""
    with _writing(path):
        writer = WRITERS[fmt](path, n, d, ids, settings)
    try:
        for batch in batches:
            with _writing(path):
                writer.write(*batch)
        with _writing(path):
            writer.close()
    except BaseException:
        writer.abort()
        raise


# The app.
def embed(
    ckpt: str | Path, data: str, out: str | Path, *, split: str = "test", layer: str = "pre_logits", pool: str | None = None,
    backend: str | None = None, batch_size: int = 256, workers: int = 0, on_batch: Callable[[int, int], None] | None = None,
    test_fraction: float = 0.2, split_seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Writes the features of every example of `data`'s `split` to `out` (see the module docstring); returns the report.

    Args:
        ckpt: a checkpoint directory, a big_vision .npz or hf://org/name[@rev] (vitctl.open).
        split: train, test, or all (train then test).
        backend: "jax" or "torch"; None: the checkpoint's own.
        on_batch: called with (images done, images in all) after each batch is written.
        test_fraction, split_seed: the train/test split of sources without one (as `vitctl train`).
    """
    from vitctl.checkpoint import atomic_file
    from vitctl.open import open_checkpoint
    from vitctl.untrusted import require_disk, sigterm_as_interrupt
    from vitctl.verify import set_precision

    t0 = time.perf_counter()
    fmt = output_format(out)
    _check_options(split, batch_size, workers)
    with (
        sigterm_as_interrupt(),
        atomic_file(out) as tmp,
        open_checkpoint(ckpt, fetch=backend or "all", label="CKPT") as ck,
        one_blas_thread(),
    ):
        ck.check_memory("CKPT")  # the parameters are held whole: refused before the data is opened
        cfg = ck.cfg
        backend, feats = default_backend(ck, backend), resolve_features(cfg, layer, pool)
        splits = _open_splits(data, split, cfg, test_fraction, split_seed)
        n, d = sum(map(len, splits)), cfg.width
        ids = IdSizes(*_id_sizes(splits))
        need = n * (4 * d + 4 + 8) + ids.total + 2**16  # embeddings, labels, id offsets, ids, headers
        require_disk(Path(out).parent, need, f"{n} embeddings of width {d}", hint="free disk space, or write --out to another disk")
        precision = set_precision("fp32" if cfg.dtype == "float32" else "bf16").get("precision")
        runner = make_runner(ck, backend, feats, logits=False)
        split_settings = {"split": split, "test_fraction": test_fraction, "split_seed": split_seed}
        settings = _settings(ckpt, ck, data, split_settings, backend, feats, n, d)
        t = time.perf_counter()
        rows = _rows(runner, splits, cfg, min(batch_size, n), pad=backend == "jax", workers=workers, on_batch=on_batch)
        write_rows(fmt, tmp, n, d, ids, settings, rows)
        seconds, size = time.perf_counter() - t, tmp.stat().st_size
    return {
        "file": str(out), "format": fmt, "num_images": n, "feature_dim": d, "bytes": size, "seconds": round(seconds, 4),
        "images_per_s": round(n / seconds, 1) if seconds > 0 else None, "total_seconds": round(time.perf_counter() - t0, 4),
        **{k: settings[k] for k in ("checkpoint", "data", "backend", "layer", "pool")}, **split_settings, "precision": precision,
    }  # fmt: skip


def _check_options(split: str, batch_size: int, workers: int) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown --split '{split}'", hint=f"choose one of: {', '.join(SPLITS)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be 0 (read in this process) or more, got {workers}")


def _open_splits(data: str, split: str, cfg: ViTConfig, test_fraction: float, seed: int) -> list:
    """The Records of `split` (all: train, then test), as `vitctl train` opens and splits them."""
    from vitctl.data.lazy import open_records

    if cfg.channels not in (1, 3):
        raise DataError(f"the model takes {cfg.channels}-channel images; data sources give 1 (grayscale) or 3 (RGB)",
                        hint="embed with a model of channels 1 or 3")  # fmt: skip
    names = ("train", "test") if split == "all" else (split,)
    splits = [open_records(str(data), s, channels=cfg.channels, test_fraction=test_fraction, seed=seed) for s in names]
    if not sum(map(len, splits)):
        raise DataError(f"{data}: the {split} split holds no examples", hint="choose another --split, or add data")
    return splits


def _id_sizes(splits: Sequence) -> tuple[int, int]:
    """(total, longest) UTF-8 bytes of every id: one pass over describe, no image read."""
    total = longest = 0
    for r in splits:
        for i in range(len(r)):
            n = len(record_id(r, i).encode())
            total, longest = total + n, max(longest, n)
    return total, longest


def _public_name(where: str | Path) -> str:
    """A named set or hf:// address as given; a local path by its final component (a shared file names no local directory)."""
    text = str(where)
    return text if text.startswith("hf://") or text in BUILT_IN else Path(text).resolve().name


def _settings(ckpt: str | Path, ck, data: str, split: dict[str, Any], backend: str, feats: Features, n: int, d: int) -> dict[str, Any]:
    """What the file's metadata says: how its embeddings were made."""
    cfg = ck.cfg
    return {
        "format": "vitctl-embeddings", "version": 1, "created_by": f"vitctl {vitctl.__version__}",
        "checkpoint": _public_name(ckpt), "checkpoint_format": ck.format, "data": _public_name(data), **split,
        "backend": backend, "layer": feats.layer, "pool": feats.pool, "image_size": cfg.image_size,
        "preprocess": dataclasses.asdict(cfg.preprocess), "dtype": cfg.dtype, "num_images": n, "feature_dim": d,
    }  # fmt: skip


def _rows(runner, splits: Sequence, cfg: ViTConfig, batch_size: int, *, pad: bool, workers: int,
          on_batch: Callable[[int, int], None] | None) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:  # fmt: skip
    """(ids, labels, features) of each batch of every split in turn; non-finite features refused."""
    total, done = sum(map(len, splits)), 0
    for r in splits:
        with contextlib.closing(stream_features(runner, r, cfg, batch_size, pad=pad, workers=workers)) as batches:
            for f, y, start in batches:
                if not np.isfinite(f).all():
                    raise DataError("the model's features hold NaN or infinite values", hint="check the checkpoint with `vitctl verify`")
                yield [record_id(r, i) for i in range(start, start + len(y))], y, f
                done += len(y)
                if on_batch:
                    on_batch(done, total)


# Reading (the tests' round trip, and anyone's): never unpickles.
def read_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, labels int32 [N], embeddings float32 [N, D]) of a file `vitctl embed` wrote, by its suffix."""
    path = Path(path)
    fmt = output_format(path)
    try:
        if fmt == "npy":
            rows = np.load(path, allow_pickle=False)
            if rows.dtype.names != ("embedding", "label", "id") or rows.ndim != 1:
                raise DataError(f"{path} is not a vitctl embeddings .npy (fields embedding, label, id)")
            return [s.decode() for s in rows["id"]], rows["label"].astype(np.int32), np.ascontiguousarray(rows["embedding"], np.float32)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id", "label", "embedding"])
            emb = table.column("embedding").combine_chunks()
            values = emb.flatten().to_numpy().astype(np.float32).reshape(len(table), emb.type.list_size)
            return table.column("id").to_pylist(), table.column("label").to_numpy().astype(np.int32), values
        t = _read_safetensors(path)
        off, blob = t["id_offsets"], t["ids"].tobytes()
        if len(off) != len(t["labels"]) + 1 or off[0] != 0 or off[-1] != len(blob) or (np.diff(off) < 0).any():
            raise DataError(f"{path}: id_offsets do not index the ids")
        return [blob[a:b].decode() for a, b in itertools.pairwise(off.tolist())], t["labels"], t["embeddings"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: a header entry of the wrong JSON type
        raise DataError(f"cannot read {path}: {e}", hint="the file is damaged or not one `vitctl embed` wrote") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """embeddings, labels, id_offsets and ids of a .safetensors, each checked to lie inside the file."""
    from vitctl.untrusted import parse_json

    dtypes = {"embeddings": ("F32", "<f4", 2), "labels": ("I32", "<i4", 1), "id_offsets": ("I64", "<i8", 1), "ids": ("U8", "u1", 1)}
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise DataError(f"{path}: a header of {n} bytes in a file of {size}")
        header = parse_json(f.read(n), str(path), DataError)
    out = {}
    for name, (code, dtype, ndim) in dtypes.items():
        e = header.get(name)
        if not isinstance(e, dict) or e.get("dtype") != code or not isinstance(e.get("shape"), list) or len(e["shape"]) != ndim:
            raise DataError(f"{path}: no {code} tensor '{name}' of {ndim} dimension(s)")
        shape, (a, b) = [int(s) for s in e["shape"]], [int(o) for o in e["data_offsets"]]
        count = int(np.prod(shape))
        if min(shape) < 0 or b - a != count * np.dtype(dtype).itemsize or not 0 <= a <= b <= size - 8 - n:
            raise DataError(f"{path}: tensor '{name}' {shape} at bytes {a}..{b} does not fit the file")
        out[name] = np.fromfile(path, dtype, count, offset=8 + n + a).reshape(shape)
    if out["embeddings"].shape[0] != len(out["labels"]):
        raise DataError(f"{path}: {out['embeddings'].shape[0]} embeddings but {len(out['labels'])} labels")
    return out
