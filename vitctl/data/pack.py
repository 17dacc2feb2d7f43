"""`vitctl data pack`: any data source vitctl reads, written once into the packed format
(vitctl.data.records) that grain reads a record at a time.

- Every source of vitctl.data.sources: digits, fashion-mnist, ImageFolder, Hugging Face
  save_to_disk / parquet, .npz, IDX. A source without a test split is split by
  vitctl.data.dataset.split_indices, exactly as `vitctl train` splits it, and the manifest
  records the settings of that split.
- ImageFolder files keep their own bytes (image_format="keep") when they are PNG or JPEG,
  but each is decoded once, fully, to refuse a truncated or corrupt file now rather than
  mid-training (PIL's verify() does not see truncation). Other files, and in-memory
  pixels (digits, .npz, IDX, Hugging Face arrays), are stored as lossless PNG.
- Decoding and encoding run in worker processes, a chunk of images per task; records are
  written in source order whatever the worker count, so the shards are byte-identical for
  any --workers.
- The output is atomic: shards are written into a temporary sibling of DST that becomes DST
  only once complete. An error, Ctrl-C or SIGTERM removes it; a temporary that SIGKILL left is
  removed by the next pack to the same DST once its owner process is gone (as
  vitctl.checkpoint does for checkpoints). --force replaces only a packed directory.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import vitctl
from vitctl import checkpoint as ckpt
from vitctl.data import records
from vitctl.data.dataset import split_indices
from vitctl.data.preprocess import IMAGE_SUFFIXES
from vitctl.data.sources import MAX_INFERRED_CLASSES, _read_source, check_split_args
from vitctl.data.sources.common import SPLITS, Source, to_channels
from vitctl.data.sources.idx import is_idx_name
from vitctl.data.sources.images import decode, folder_files, folder_source, list_image_folder
from vitctl.errors import ConfigError, DataError, OutputError, OutputExistsError, VitctlError
from vitctl.untrusted import read_json, require_disk, sigterm_as_interrupt

IMAGE_FORMATS = ("keep", "png", "jpeg")
CHUNK = 64  # images per worker task: large enough to hide the task overhead, small enough to stop fast
IN_FLIGHT = 4  # tasks queued per worker: keeps workers busy while bounding memory
SHARD_BYTES = 256 * 10**6
RECORD_OVERHEAD = 16  # ArrayRecord's per-record bytes beside the record itself (an estimate, for shard sizes)
SHARD_OVERHEAD = 2**17  # an ArrayRecord file's footer and block padding
SKIPPED_SHOWN = 5  # skipped files named in the summary
# Lower estimates of output bytes per source byte: a refusal must never be a false alarm.
# Keeping files copies them; PNG of raw pixels rarely compresses natural images 4x; JPEG 20x.
SIZE_RATIO = {("file", "keep"): 1.0, ("file", "png"): 1.0, ("file", "jpeg"): 0.05, ("array", "keep"): 0.25,
              ("array", "png"): 0.25, ("array", "jpeg"): 0.05}  # fmt: skip


@dataclasses.dataclass
class Split:
    """One split to pack: labels, and the work for each example (a file to read, or pixels to encode)."""

    labels: np.ndarray
    jobs: Callable[[np.ndarray], list[tuple[str, Any]]]  # indices -> ("file", path) or ("array", [H, W(, C)] uint8)
    names: Callable[[int], str]  # index -> what an error names: the file, or the row
    source_bytes: int  # bytes read (files) or decoded (arrays): for the disk estimate
    kind: str  # "file" or "array"


# --------------------------------------------------------------------------- sources


def _is_image_folder(path: Path) -> bool:
    """The same test, in the same order, as vitctl.data.sources picks a reader by."""
    if not path.is_dir() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return False
    return not any(path.rglob("*.parquet")) and not any(is_idx_name(p.name.lower(), "images") for p in path.iterdir())


def _folder_splits(root: Path, channels: int) -> tuple[dict[str, Split], Source]:
    """An ImageFolder's files per split, in read_image_folder's order (its labels, its checks)."""
    roots, files = folder_files(root)
    empty = [str(roots[s] / c) for s, per_class in files.items() for c, fs in per_class.items() if not fs]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"class folder {empty[0]} holds no images{more} ({', '.join(IMAGE_SUFFIXES)})",
                        hint="add images to it or remove it: an empty class would still take a label")  # fmt: skip
    listing = list_image_folder(root, (roots, files))
    source = folder_source(listing, channels)
    splits = {}
    for s, paths in listing.paths.items():
        size = sum(p.stat().st_size for p in paths)
        splits[s] = Split(
            listing.labels[s], lambda idx, p=paths: [("file", str(p[i])) for i in idx], lambda i, p=paths: str(p[i]), size, "file"
        )
    return splits, source


def _array_splits(source: Source, spec: str) -> dict[str, Split]:
    splits = {}
    for s, part in source.parts.items():
        first = np.asarray(part.images(np.arange(min(1, len(part.labels)))))
        size = int(first[0].size) * len(part.labels) if len(first) else 0
        jobs = lambda idx, images=part.images: [("array", np.asarray(im)) for im in images(idx)]
        splits[s] = Split(part.labels, jobs, lambda i, s=s: f"{spec} ({s}) row {i}", size, "array")
    return splits


def _read(spec: str, channels: int, test_fraction: float, seed: int) -> tuple[dict[str, tuple[Split, np.ndarray]], int, tuple | None, dict]:
    """{split: (Split, row indices)}, num_classes, class_names, and how train/test were split."""
    check_split_args("train", channels, test_fraction)
    if _is_image_folder(Path(spec)) and spec not in ("digits", "fashion-mnist"):
        parts, source = _folder_splits(Path(spec), channels)
    else:
        source = _read_source(spec, channels)
        parts = _array_splits(source, spec)
    num_classes = source.num_classes or int(max(p.labels.max(initial=-1) for p in parts.values())) + 1
    for s, part in parts.items():
        bad = np.flatnonzero((part.labels < 0) | (part.labels >= num_classes))
        if len(bad):
            raise DataError(f"{part.names(int(bad[0]))} has label {part.labels[bad[0]]}, outside [0, {num_classes})"
                            + (f" ({len(bad)} rows in all)" if len(bad) > 1 else ""),
                            hint="labels must be class indices 0..K-1; fix or remove those rows")  # fmt: skip
    if not source.num_classes and num_classes > MAX_INFERRED_CLASSES:
        raise DataError(f"{spec}: the largest label is {num_classes - 1}, so the model would need {num_classes} classes",
                        hint=f"labels must be class indices 0..K-1 (at most {MAX_INFERRED_CLASSES} classes read from the labels); remap them")  # fmt: skip
    if "all" in parts:
        train, test = split_indices(parts["all"].labels, test_fraction, seed)
        chosen, how = {"train": (parts["all"], train), "test": (parts["all"], test)}, {"test_fraction": test_fraction, "seed": seed}
    else:
        chosen, how = {s: (parts[s], np.arange(len(parts[s].labels))) for s in SPLITS if s in parts}, {"from": "source"}
    for s, (_, idx) in chosen.items():
        if not len(idx):
            raise DataError(f"{spec}: the {s} split is empty", hint="add data, or hold out another share (--test-fraction)")
    return chosen, num_classes, source.class_names, how


# --------------------------------------------------------------------------- workers


def _pil_image(pixels: np.ndarray, channels: int):
    from PIL import Image

    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    elif pixels.ndim == 3 and channels == 1:
        pixels = to_channels(pixels, 1)[..., 0]
    return Image.fromarray(np.ascontiguousarray(pixels, np.uint8))  # gray stays gray: decoding to RGB repeats it exactly


def _encode_one(job: tuple[str, Any], image_format: str, quality: int, channels: int) -> tuple[bytes, int] | str:
    """(bytes to store, format code) for one job, or why it failed (a string, named by the caller)."""
    kind, payload = job
    try:
        if kind == "file":
            with open(payload, "rb") as f:
                data = f.read(records.MAX_IMAGE_BYTES + 1)
            if len(data) > records.MAX_IMAGE_BYTES:
                return f"the file is larger than a record holds ({records.MAX_IMAGE_BYTES:,} bytes)"
            pixels = decode(io.BytesIO(data), channels)  # a full decode: truncation shows only here
            if image_format == "keep":
                fmt = next((code for code, sig in records.SIGNATURES.items() if data.startswith(sig)), None)
                if fmt is not None:
                    return data, fmt
        else:
            pixels = payload
        out = io.BytesIO()
        if image_format == "jpeg":
            _pil_image(pixels, channels).save(out, format="JPEG", quality=quality)
            return out.getvalue(), records.JPEG
        # zlib's fastest level: packing to PNG is bound by the encoder, and higher levels save little on photos.
        _pil_image(pixels, channels).save(out, format="PNG", compress_level=1)
        return out.getvalue(), records.PNG
    except DataError as e:
        return e.message
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def _encode_chunk(jobs: list[tuple[str, Any]], image_format: str, quality: int, channels: int) -> list[tuple[bytes, int] | str]:
    return [_encode_one(job, image_format, quality, channels) for job in jobs]


def _worker_init() -> None:
    # The parent alone handles Ctrl-C and SIGTERM (and then terminates its workers): a worker
    # interrupted mid-task would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _encoder(workers: int, *args: Any) -> Iterator[Callable[[Iterator[list]], Iterator[list]]]:
    """A function from chunks of jobs to their results, in order: inline, or on a pool of
    `workers` processes with at most IN_FLIGHT chunks each queued. The pool is terminated on exit."""
    if workers <= 1:
        yield lambda chunks: (_encode_chunk(c, *args) for c in chunks)
        return
    # spawn: a clean interpreter per worker, whatever threads (Rich's refresh, Arrow's) the parent runs.
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)

    def run(chunks: Iterator[list]) -> Iterator[list]:
        pending: collections.deque = collections.deque()
        for c in chunks:
            pending.append(pool.apply_async(_encode_chunk, (c, *args)))
            if len(pending) >= IN_FLIGHT * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield run
    finally:
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------- shards


class ShardWriter:
    """Records of one split into shards of about `shard_bytes`, named `SPLIT-00000-of-0000N` at `finish`."""

    def __init__(self, root: Path, split: str, shard_bytes: int):
        self.root, self.split, self.shard_bytes = root, split, shard_bytes
        self.paths: list[Path] = []
        self.counts: list[int] = []
        self.writer, self.size = None, 0

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is not None and self.size + len(record) + RECORD_OVERHEAD > self.shard_bytes:
            self._close()
        with _write_errors(self):
            if self.writer is None:
                self.paths.append(self.root / f"{self.split}-{len(self.paths):05d}.array_record")
                self.counts.append(0)
                # group_size:1: every record its own chunk, so a random read decodes one record;
                # uncompressed: PNG and JPEG are compressed already.
                self.writer, self.size = ArrayRecordWriter(str(self.paths[-1]), "group_size:1,uncompressed"), 0
            self.writer.write(record)
        self.size += len(record) + RECORD_OVERHEAD
        self.counts[-1] += 1

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        with _write_errors(self):
            writer.close()

    def finish(self) -> list[dict[str, Any]]:
        if self.writer is not None:
            self._close()
        shards = []
        for k, (path, n) in enumerate(zip(self.paths, self.counts)):
            final = path.with_name(records.shard_name(self.split, k, len(self.paths)))
            path.rename(final)
            shards.append({"file": final.name, "num_records": n, "bytes": final.stat().st_size, "sha256": records.sha256_file(final)})
        return shards

    def abandon(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()


@contextlib.contextmanager
def _write_errors(w: ShardWriter) -> Iterator[None]:
    """ArrayRecord reports a failed write as RuntimeError with the OS's reason in its text."""
    try:
        yield
    except (RuntimeError, OSError) as e:
        w.abandon()
        full = ckpt.no_space(e)
        raise OutputError(f"cannot write {w.paths[-1] if w.paths else w.root}: {full or e}",
                          hint="free disk space, or write to another disk" if full else "check the output directory") from None  # fmt: skip


# --------------------------------------------------------------------------- output

# What a packed directory (and a temporary of one) holds: the manifest, shards (named
# SPLIT-00000 while their count is unknown), and checkpoint's owner record in a temporary.
PACKED_ENTRY = re.compile(rf"{re.escape(records.MANIFEST)}|(train|test)-\d{{5}}(-of-\d{{5}})?\.array_record")


def _not_packed(d: Path) -> str | None:
    """Why directory `d` holds something other than what `vitctl data pack` writes, or None."""
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as e:
        return f"it cannot be listed: {e.strerror or e}"
    for e in entries:
        if not (e.name == ckpt.OWNER or PACKED_ENTRY.fullmatch(e.name)) or not e.is_file(follow_symlinks=False):
            return f"it holds {e.name}, which vitctl data pack does not write"
    return None


def _check_replaceable(dst: Path, force: bool) -> None:
    if not dst.exists() and not dst.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"{dst} already exists", hint="pass --force to replace it, or choose another output path")
    why = "it is a symlink" if dst.is_symlink() else "it is a file" if not dst.is_dir() else _not_packed(dst)
    if why is None and any(dst.iterdir()) and not records.is_packed(dst):
        why = f"it has no {records.FORMAT} {records.MANIFEST}"
    if why:
        raise OutputExistsError(f"{dst} exists and is not a packed data directory ({why}); refusing to replace it even with --force",
                                hint=f"vitctl replaces only what it wrote; remove {dst} yourself, or choose another output path")  # fmt: skip


def reclaim_temporaries(dst: Path) -> list[Path]:
    """Removes `.DST.tmp-XXXXXXXX` / `.DST.old-XXXXXXXX` siblings that an earlier pack left when it
    was killed (SIGKILL): packed entries only, owned by a process of this machine that is gone.
    The same rule as vitctl.checkpoint.reclaim_temporaries, for packed entries instead of checkpoint ones."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-[0-9a-f]{{8}}")
    try:
        siblings = sorted(p for p in dst.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []
    removed = []
    for p in siblings:
        if p.is_symlink() or not p.is_dir() or _not_packed(p):
            continue  # not a pack's temporary after all: never touched
        try:
            owner = read_json(p / ckpt.OWNER, DataError)
        except VitctlError:
            owner = {}
        alive = ckpt._owner_alive(owner)
        if alive is False:
            ckpt.remove_tree(p)
            if not p.exists():
                removed.append(p)
                ckpt._note(f"removed {p}, a temporary left by an interrupted vitctl data pack (process {owner['pid']}, no longer running)")
        elif alive is None:
            ckpt._note(f"left {p} in place: it looks like an interrupted pack's temporary; remove it if no vitctl is writing {dst}")
    return removed


@contextlib.contextmanager
def packed_output(dst: Path, force: bool) -> Iterator[Path]:
    """vitctl.checkpoint.atomic_output for a packed directory: a temporary sibling that becomes
    `dst` only when the block completes, removed on any exception (KeyboardInterrupt included)."""
    _check_replaceable(dst, force)
    reclaim_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create {dst}: {e.strerror or e}", hint=f"check that {dst.parent} is a writable directory") from None
        ckpt._claim(tmp)
        yield tmp
        ckpt.raise_if_interrupted()
        _check_replaceable(dst, force)  # something may have appeared meanwhile
        (tmp / ckpt.OWNER).unlink()
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
            dst.rename(old)
            try:
                with contextlib.suppress(OSError):
                    ckpt._claim(old)  # a kill before the removal below leaves it to the next run
                tmp.rename(dst)
            except BaseException:
                if not dst.exists():
                    old.rename(dst)
                    (dst / ckpt.OWNER).unlink(missing_ok=True)
                raise
            ckpt.remove_tree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        ckpt.remove_tree(tmp)
        raise


# --------------------------------------------------------------------------- pack


def _pack_split(split: str, part: Split, idx: np.ndarray, tmp: Path, encode, *, num_classes: int, shard_bytes: int,
                skip_bad: bool, progress: Callable[[int], None]) -> tuple[dict[str, Any], list[str], set[int]]:  # fmt: skip
    """Writes one split's shards; returns its manifest entry, the skipped images' names and the formats written."""
    writer = ShardWriter(tmp, split, shard_bytes)
    counts = np.zeros(num_classes, np.int64)
    skipped, formats, pos = [], set(), 0
    chunks = (part.jobs(idx[i : i + CHUNK]) for i in range(0, len(idx), CHUNK))
    try:
        for results in encode(chunks):
            for r in results:
                row, pos = int(idx[pos]), pos + 1
                if isinstance(r, str):
                    if not skip_bad:
                        raise DataError(f"cannot decode image {part.names(row)}: {r}",
                                        hint="remove or replace the file, or pass --skip-bad to leave unreadable images out")  # fmt: skip
                    skipped.append(part.names(row))
                    continue
                label = int(part.labels[row])
                writer.write(records.encode_record(r[0], label, r[1]))
                counts[label] += 1
                formats.add(r[1])
            progress(len(results))
        shards = writer.finish()
    finally:
        writer.abandon()
    if not counts.sum():
        raise DataError(f"no image of the {split} split could be read ({len(skipped)} skipped)", hint="check the source's images")
    return {"num_examples": int(counts.sum()), "class_counts": counts.tolist(), "shards": shards}, skipped, formats


def _options(image_format: str, jpeg_quality: int, shard_bytes: int | str, workers: int | None) -> tuple[int, int]:
    from vitctl.formats.base import parse_size

    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"unknown image format '{image_format}'", hint=f"use one of {', '.join(IMAGE_FORMATS)}")
    if not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}", hint="95 keeps photos visually lossless")
    shard_bytes = parse_size(shard_bytes)
    if shard_bytes <= 0:
        raise ConfigError(f"the shard size must be positive, got {shard_bytes}", hint="e.g. --shard-size 256MB")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    return shard_bytes, workers


def pack(src_spec: str, dst: str | Path, *, workers: int | None = None, image_format: str = "keep", jpeg_quality: int = 95,
         shard_bytes: int | str = SHARD_BYTES, skip_bad: bool = False, test_fraction: float = 0.2, seed: int = 0, channels: int = 3,
         force: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Packs data source `src_spec` into directory `dst` (see the module docstring).

    Args:
        src_spec: "digits", "fashion-mnist", or a path, as vitctl.data.sources.load_dataset takes.
        workers: processes that decode and encode images (default: the CPU count; 1: none).
        image_format: "keep" (files as they are if PNG or JPEG, else PNG), "png" or "jpeg".
        shard_bytes: about how large each shard grows (bytes, or a size like "256MB").
        skip_bad: leave out images that do not decode (counted and named in the summary).
        test_fraction, seed: the split of a source without a test split (as `vitctl train`).
        channels: 1 or 3: what pixels are converted to when encoded, and readers decode to.
        progress: called with (images done, images in all) after each chunk.

    Returns:
        A summary: dst, examples, bytes, splits, skipped (and the first few names), seconds, images/s.
    """
    start = time.perf_counter()
    dst, src_spec = Path(dst), str(src_spec)
    shard_bytes, workers = _options(image_format, jpeg_quality, shard_bytes, workers)
    _check_replaceable(dst, force)  # before reading the source: refused at once
    chosen, num_classes, class_names, how = _read(src_spec, channels, test_fraction, seed)
    total = sum(len(idx) for _, idx in chosen.values())
    estimate = sum(
        round(p.source_bytes * len(idx) / max(1, len(p.labels)) * SIZE_RATIO[p.kind, image_format]) for p, idx in chosen.values()
    )
    require_disk(dst.parent, estimate + SHARD_OVERHEAD, f"packing {src_spec} (at least, as {image_format})",
                 hint="free disk space, write to another disk, or pack with --image-format jpeg")  # fmt: skip
    workers = min(workers, -(-total // CHUNK))
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    splits, skipped, formats = {}, [], set()
    with sigterm_as_interrupt(), packed_output(dst, force) as tmp, _encoder(workers, image_format, jpeg_quality, channels) as encode:
        for split, (part, idx) in chosen.items():
            splits[split], bad, fmts = _pack_split(split, part, idx, tmp, encode, num_classes=num_classes, shard_bytes=shard_bytes,
                                                   skip_bad=skip_bad, progress=advance)  # fmt: skip
            skipped += bad
            formats |= fmts
        stored = "+".join(records.FORMAT_NAMES[f] for f in sorted(formats))
        manifest = {"format": records.FORMAT, "version": records.VERSION, "created_by": f"vitctl {vitctl.__version__}",
                    "source": ckpt.public_value(src_spec, True), "image_format": stored, "channels": channels, "num_classes": num_classes,
                    "class_names": list(class_names) if class_names else None, "split": how, "splits": splits}  # fmt: skip
        if image_format == "jpeg":
            manifest["jpeg_quality"] = jpeg_quality
        ckpt.write_json(tmp / records.MANIFEST, manifest)
    seconds = time.perf_counter() - start
    examples = sum(s["num_examples"] for s in splits.values())
    nbytes = sum(sh["bytes"] for s in splits.values() for sh in s["shards"])
    return {"src": src_spec, "dst": str(dst), "examples": examples, "bytes": nbytes, "image_format": stored, "workers": workers,
            "num_classes": num_classes, "splits": {s: {"num_examples": v["num_examples"], "shards": len(v["shards"]),
                                                       "bytes": sum(sh["bytes"] for sh in v["shards"])} for s, v in splits.items()},
            "skipped": len(skipped), "skipped_files": skipped[:SKIPPED_SHOWN], "seconds": seconds,
            "images_per_s": (examples + len(skipped)) / seconds if seconds > 0 else None}  # fmt: skip
