"""The streaming conversion driver: plan from headers, then one tensor at a time.

    source reader --(source names)--> hub --(per-layer JAX names)--> target writer
    vitctl-jax (Orbax params/)        rename + Layout per tensor     vitctl-torch (safetensors, sharded)
    vitctl-torch (safetensors)        (params.PARAMS)                vitctl-jax (Orbax params/)
    big_vision .npz                                                  timm (one model.safetensors)
    timm (its own or vitctl's export)                                hf (transformers' ViT: config.json,
    hf (transformers' ViT)                                               safetensors, preprocessor_config.json)

- `plan()` opens the source through vitctl.open (a path or hf://...), reads only headers, and checks coverage before any data
  is read: every source tensor maps to exactly one hub tensor with the shape the model
  config implies, every target tensor is made from hub tensors used exactly once. A
  config.json that contradicts the weights fails here (UnmappedParamError naming them).
- `run()` streams: read one tensor (or one stored chunk / one scanned layer) into a reused
  buffer, re-lay it out, cast it, write it, drop it. Peak memory is a fixed overhead plus a few times the
  largest tensor (`Plan.estimated_peak_bytes`: the RSS at planning + 32 MiB + 7x), never the checkpoint.
- dtype: "keep" writes each tensor in its source dtype; "float32" / "bfloat16" cast
  floating tensors. fp32 -> bf16 rounds to nearest even (ml_dtypes), bit-identical to
  torch.Tensor.to(torch.bfloat16) for every non-NaN value; a NaN becomes the canonical
  quiet NaN of its sign (torch's vectorised CPU cast writes 0xFFFF for every NaN).
- vitctl-jax output is Orbax's one-directory-per-array layout, chunks uncompressed, written as
  plain files (OrbaxWriter without compression or OCDBT); `compress=True` writes Orbax's default instead (OCDBT, zstd
  level 1) through tensorstore: on float weights zstd saves ~8% of the bytes for most of the
  CPU time of writing and, later, reading it. Orbax restores either. A tensor reaches its
  writer as it comes (often a transposed view): the safetensors and Orbax-files writers
  re-lay it out a cache-sized block of rows at a time while a background thread writes the
  blocks (fastcopy.BlockWriter); the OCDBT writer copies it into one reused buffer.
- Output: everything is written into a temporary sibling of DST and renamed at the end
  (checkpoint.atomic_output): an error, Ctrl-C or SIGTERM leaves no DST. SIGTERM is
  turned into KeyboardInterrupt for the duration of `run()`, so both exit 130 in the CLI.
- DST/config.json: the source's model config (param_dtype set to the written dtype),
  and provenance {source_format, source, created_by, dtype, target_format, source_provenance}.
  Safetensors metadata: {"format": "pt", "source_format", "source_dtype", "vitctl_version"}.

Shapes: D width, N heads, K head_dim, F mlp_dim, L depth (see vitctl.config).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import vitctl
from vitctl import checkpoint as ckpt
from vitctl import untrusted
from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError
from vitctl.formats import fastcopy, layout
from vitctl.formats.base import Writer, parse_size
from vitctl.formats.orbax import OrbaxWriter
from vitctl.formats.safetensors import INDEX, SafetensorsWriter, plan_shards, shard_names
from vitctl.open import BIG_VISION, HF, JAX, TIMM, TORCH, Checkpoint, detect, locate, open_checkpoint
from vitctl.params import jax_param_shapes, rename, torch_param_shapes
from vitctl.untrusted import sigterm_as_interrupt

DTYPES = {"keep": None, "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}
# Headroom above the process's RSS at planning time (interpreter, numpy, tensorstore, typer,
# rich: 60-110 MiB depending on the machine) for what the first tensor brings: tensorstore's
# thread pool and cache, the reader's and writer's threads and their malloc arenas.
BASE_HEADROOM_BYTES = 32 * 2**20
# Peak RSS above the base, in units of the largest tensor (or stored chunk, if larger): the
# tensor read plus the next one read ahead (an Orbax read holds the compressed and the decoded
# chunk), the re-laid-out copy, and the writer's copy and compressed bytes in flight.
# Measured with 64 MiB float32 tensors: 5.0x jax-to-torch, 6.4x torch-to-jax (zstd on).
PIPELINE_FACTOR = 7
SLEEP_ENV = "VITCTL_TEST_SLEEP_PER_TENSOR"  # tests only: seconds to pause after each tensor


@dataclasses.dataclass(frozen=True)
class Direction:
    sources: tuple[str, ...]  # source formats, in detection preference
    targets: dict[str, str]  # --format value -> target format
    fetch: str  # what an hf:// source downloads (vitctl.open.locate)
    other: str  # the direction that converts the other way


DIRECTIONS = {
    "jax-to-torch": Direction((JAX, BIG_VISION), {"vitctl": TORCH, "timm": TIMM, "hf": HF}, "jax", "torch-to-jax"),
    "torch-to-jax": Direction((TORCH, TIMM, HF), {"vitctl": JAX}, "torch", "jax-to-torch"),
}


# Targets: which tensors, made from which hub tensors, how, written by what.
@dataclasses.dataclass(frozen=True)
class TargetTensor:
    name: str  # in the target's naming
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # hub names it is made of (several: a fused timm tensor)


def _identity(items: Iterable[tuple[str, np.ndarray]], cfg: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    yield from items


def _hub_to_torch(items: Iterable[tuple[str, np.ndarray]], cfg: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    for hub, w in items:
        name, form = rename(hub, "jax")
        out = form.to_torch(w)
        del w
        yield name, out
        del out


def _hub_to_timm(items: Iterable[tuple[str, np.ndarray]], cfg: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    from vitctl.convert import timm

    yield from timm.iter_timm_tensors(_hub_to_torch(items, cfg), cfg, stacks=True)  # fused tensors: written part by part


def _hub_to_hf(items: Iterable[tuple[str, np.ndarray]], cfg: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    from vitctl.convert import hf

    yield from ((hf.hf_name(n, hf.PREFIX), w) for n, w in _hub_to_torch(items, cfg))


def _jax_tensors(cfg: ViTConfig) -> list[TargetTensor]:
    return [TargetTensor(n, s, (n,)) for n, s in jax_param_shapes(cfg, stacked=False).items()]


def _torch_tensors(cfg: ViTConfig) -> list[TargetTensor]:
    shapes = torch_param_shapes(cfg)
    return [TargetTensor(rename(n, "jax")[0], tuple(shapes[rename(n, "jax")[0]]), (n,)) for n in jax_param_shapes(cfg, stacked=False)]


def _timm_tensors(cfg: ViTConfig) -> list[TargetTensor]:
    from vitctl.convert import timm

    return [TargetTensor(t.name, tuple(t.shape), tuple(rename(s, "torch")[0] for s in t.sources)) for t in timm.timm_tensor_plan(cfg)]


def _hf_tensors(cfg: ViTConfig) -> list[TargetTensor]:
    from vitctl.convert import hf

    hf.check_expressible(cfg)
    return [TargetTensor(hf.hf_name(t.name, hf.PREFIX), t.shape, t.sources) for t in _torch_tensors(cfg)]


@dataclasses.dataclass(frozen=True)
class Target:
    format: str
    tensors: Callable[[ViTConfig], list[TargetTensor]]  # in write order
    from_hub: Callable[[Iterable[tuple[str, np.ndarray]], ViTConfig], Iterator[tuple[str, np.ndarray]]]
    sharded: bool  # honours --max-shard-size


TARGETS = {
    JAX: Target(JAX, _jax_tensors, _identity, sharded=False),
    TORCH: Target(TORCH, _torch_tensors, _hub_to_torch, sharded=True),
    TIMM: Target(TIMM, _timm_tensors, _hub_to_timm, sharded=False),  # timm reads one model.safetensors
    HF: Target(HF, _hf_tensors, _hub_to_hf, sharded=True),
}


# The plan.
@dataclasses.dataclass
class Plan:
    """Everything `run` will do, decided from headers: no tensor data read yet."""

    direction: str
    src: Path
    dst: Path
    source: Checkpoint  # open, its coverage checked
    target: Target
    dtype: str  # --dtype: keep, float32, bfloat16
    cfg: ViTConfig  # DST's model config
    specs: list[tuple[str, tuple[int, ...], np.dtype]]  # every target tensor, in write order
    files: list[str]  # what DST will hold (besides config.json)
    max_shard_bytes: int | None
    estimated_peak_bytes: int
    compress: bool = False  # vitctl-jax target: zstd level 1 on each stored chunk

    @property
    def bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, s, d in self.specs)

    def summary(self) -> dict[str, Any]:
        dtypes = sorted({str(d) for _, _, d in self.specs})
        if self.target.format == TIMM:  # how timm loads DST: the point of the export
            from vitctl.convert import timm

            return {**self._summary(dtypes), "timm": timm.load_calls(self.cfg, self.dst)}
        return self._summary(dtypes)

    def _summary(self, dtypes: list[str]) -> dict[str, Any]:
        return {
            "src": str(self.src), "dst": str(self.dst), "direction": self.direction,
            "source_format": self.source.format, "format": self.target.format, "dtype": self.dtype,
            "output_dtypes": dtypes, "tensors": len(self.specs), "bytes": self.bytes,
            "source_bytes": sum(i.nbytes for i in self.source.infos.values()),
            "shards": sum(f.endswith(".safetensors") for f in self.files) or 1, "files": [layout.CONFIG, *self.files],
            "estimated_peak_bytes": self.estimated_peak_bytes, "notes": list(self.source.notes),
        }  # fmt: skip


def plan(
    src: str | Path,
    dst: str | Path,
    direction: str,
    target_format: str = "vitctl",
    dtype: str = "keep",
    max_shard_size: str | int | None = "5GB",
    source_format: str | None = None,
    model: ViTConfig | None = None,
    prefix: str | None = None,
    force: bool = False,
    compress: bool = False,
) -> Plan:
    """Opens SRC (a path or hf://...), checks every name and shape against the config, and lays out DST. Reads no data.

    The caller owns `plan.source` (close it, or use `convert`, which does).
    """
    d = DIRECTIONS[direction]
    src, dst = locate(src, fetch=d.fetch), Path(dst)
    _check_paths(src, dst, force)
    if target_format not in d.targets:
        raise ConfigError(f"--format {target_format} is not available for {direction}", hint=f"choose one of: {', '.join(d.targets)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype '{dtype}'", hint=f"choose one of: {', '.join(DTYPES)}")
    fmt = source_format or detect(
        src, d.sources, doing=f"convert {direction}", other_hint=f"`vitctl convert {d.other}` converts the other way"
    )
    if fmt not in d.sources:
        raise ConfigError(f"--from {fmt} cannot be converted by {direction}", hint=f"its sources are: {', '.join(d.sources)}")
    target = TARGETS[d.targets[target_format]]
    max_bytes = parse_size(max_shard_size) if max_shard_size is not None and target.sharded else None
    source = open_checkpoint(src, fmt=fmt, model=model, prefix=prefix)
    try:
        source.check_coverage()  # every name and shape, from headers, before any data is read
        p = dataclasses.replace(_lay_out(direction, src, dst, source, target, dtype, max_bytes), compress=compress)
        _check_memory(p)
        return p
    except BaseException:
        source.close()
        raise


def _check_memory(p: Plan) -> None:
    """Refuses, with the numbers, a conversion whose planned peak exceeds the memory this process can get:
    a small file can declare a huge tensor (a deflated .npz member inflates ~1000x), so the plan's
    estimate is compared with the machine before any tensor is read."""
    largest = max((max(i.nbytes, i.chunk_bytes) for i in p.source.infos.values()), default=0)
    untrusted.require_memory(
        p.estimated_peak_bytes - _current_peak_rss(),
        f"converting {p.src} (its largest tensor or stored chunk holds {largest / 2**20:,.1f} MiB, read, re-laid out and written a few at a time)",
        hint="run it on a machine with more memory; `vitctl convert ... --dry-run` shows the estimate",
    )


def _lay_out(direction: str, src: Path, dst: Path, source: Checkpoint, target: Target, dtype: str, max_bytes: int | None) -> Plan:
    tensors = target.tensors(source.cfg)
    _check_target_coverage(tensors, source)
    specs = [(t.name, t.shape, _out_dtype(t, source, dtype)) for t in tensors]
    cfg = _output_config(source.cfg, {d for _, _, d in specs})
    files = _target_files(target, specs, max_bytes)
    peak = _current_peak_rss() + BASE_HEADROOM_BYTES + max((_step_bytes(t, s, source) for t, s in zip(tensors, specs)), default=0)
    return Plan(direction, src, dst, source, target, dtype, cfg, specs, files, max_bytes, peak)


def _check_paths(src: Path, dst: Path, force: bool) -> None:
    if not src.exists():
        raise CheckpointError(f"no such file or directory: {src}", hint="SRC is a checkpoint directory or a big_vision .npz file")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConfigError(f"DST {dst} overlaps SRC {src}", hint="write the converted checkpoint to a separate directory")
    ckpt.check_output(dst, force)


def _check_target_coverage(tensors: list[TargetTensor], source: Checkpoint) -> None:
    """Every hub tensor feeds exactly one target tensor; target names are unique."""
    used = [s for t in tensors for s in t.sources]
    twice = sorted({s for s in used if used.count(s) > 1}) if len(used) != len(set(used)) else []
    unused = sorted(set(source.hub_shapes) - set(used))
    unknown = sorted(set(used) - set(source.hub_shapes))
    names = [t.name for t in tensors]
    if twice or unused or unknown or len(names) != len(set(names)):
        raise UnmappedParamError(
            f"the target table does not use every source tensor exactly once: twice {twice[:4]}, unused {unused[:4]}, unknown {unknown[:4]}",
            hint="this is a bug in vitctl's target table; report it",
        )


def _out_dtype(t: TargetTensor, source: Checkpoint, dtype: str) -> np.dtype:
    """--dtype for floating tensors; else (and with keep) the dtype of its first source tensor."""
    first = np.dtype(source.info(t.sources[0]).dtype) if t.sources else _first_dtype(source)
    return DTYPES[dtype] if DTYPES[dtype] is not None and first in FLOATS else first


def _first_dtype(source: Checkpoint) -> np.dtype:
    """The dtype of the first tensor in the source (a timm tensor with no source part, e.g. a zero bias, takes it)."""
    return np.dtype(next(iter(source.infos.values())).dtype) if source.infos else np.dtype(np.float32)


def _output_config(cfg: ViTConfig, dtypes: set[np.dtype]) -> ViTConfig:
    names = {str(d) for d in dtypes}
    if len(names) == 1 and names <= {"float32", "bfloat16"}:
        return dataclasses.replace(cfg, param_dtype=names.pop())
    return cfg


def _target_files(target: Target, specs: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int | None) -> list[str]:
    if target.format == JAX:
        return [layout.PARAMS + "/"]
    shards = plan_shards([(n, math.prod(s) * d.itemsize) for n, s, d in specs], max_bytes)
    return shard_names(len(shards)) + ([INDEX] if len(shards) > 1 else []) + ([layout.PREPROCESSOR] if target.format == HF else [])


def _current_peak_rss() -> int:
    """This process's peak RSS so far, in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _step_bytes(t: TargetTensor, spec: tuple[str, tuple[int, ...], np.dtype], source: Checkpoint) -> int:
    """Peak bytes above the base while making one target tensor (see PIPELINE_FACTOR)."""
    held = sum(max(i.nbytes, i.chunk_bytes) for i in map(source.info, t.sources))  # a stored chunk may span layers
    return PIPELINE_FACTOR * max(held, math.prod(spec[1]) * spec[2].itemsize)


# Running it.
def _open_writer(plan: Plan, tmp: Path) -> Writer:
    if plan.target.format == JAX and plan.compress:
        return OrbaxWriter(tmp / layout.PARAMS, plan.specs, layout.CHUNK_BYTES, compress=True)
    if plan.target.format == JAX:
        return OrbaxWriter(tmp / layout.PARAMS, plan.specs, layout.CHUNK_BYTES, compress=False, use_ocdbt=False)
    src_dtypes = sorted({str(plan.source.info(h).dtype) for h in plan.source.hub_shapes})
    metadata = {
        "format": "pt", "source_format": plan.source.format, "vitctl_version": vitctl.__version__,
        "source_dtype": src_dtypes[0] if len(src_dtypes) == 1 else ",".join(src_dtypes),
    }  # fmt: skip
    return SafetensorsWriter(tmp, plan.specs, plan.max_shard_bytes, metadata)


def stream(plan: Plan) -> Iterator[tuple[str, np.ndarray]]:
    """(target name, array) for every target tensor, one at a time: often a transposed view, in
    the source dtype; the writer lays it out and casts it to the planned dtype as it writes."""
    yield from plan.target.from_hub(plan.source.iter_hub(), plan.source.cfg)


def run(plan: Plan, force: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Writes DST from the plan, one tensor at a time; returns the summary with seconds and peak RSS."""
    t0 = time.perf_counter()
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    with sigterm_as_interrupt(), fastcopy.pooled(), ckpt.atomic_output(plan.dst, force) as tmp:
        writer = _open_writer(plan, tmp)
        try:
            nbytes = {n: math.prod(s) * d.itemsize for n, s, d in plan.specs}
            for name, w in stream(plan):
                writer.write(name, w)
                del w
                if progress:
                    progress(nbytes[name])
                if sleep:
                    time.sleep(sleep)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_config(plan, tmp)
    return {**plan.summary(), "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes()}


def _write_config(plan: Plan, tmp: Path) -> None:
    provenance = {
        "source_format": plan.source.format, "source": str(plan.src.resolve()), "created_by": f"vitctl convert {plan.direction}",
        "dtype": plan.dtype, "target_format": plan.target.format,
    }  # fmt: skip
    if plan.source.provenance:
        provenance["source_provenance"] = plan.source.provenance
    head = None
    if plan.target.format == TIMM:  # timm's create_model("local-dir:DST") reads its own keys; vitctl's ride along
        from vitctl.convert import timm

        head = timm.timm_hub_config(plan.cfg, _class_names(plan.source.provenance))
    if plan.target.format == HF:  # transformers reads its own keys (vitctl's ride along) and its image processor's file
        from vitctl.convert import hf

        head = hf.hf_hub_config(plan.cfg, _class_names(plan.source.provenance))
        ckpt.write_json(tmp / layout.PREPROCESSOR, hf.preprocessor_config(plan.cfg))
    ckpt.write_config(tmp, plan.cfg, provenance, head)  # local paths in provenance become public names there


def _class_names(provenance: Any) -> Any:
    """The first class names recorded along the checkpoint's lineage (its provenance, then its source's)."""
    for _ in range(16):  # lineages are short; a hostile config.json may nest deeper
        if not isinstance(provenance, dict):
            return None
        if provenance.get("class_names") is not None:
            return provenance["class_names"]
        provenance = provenance.get("source_provenance")
    return None


def convert(
    src: str | Path, dst: str | Path, direction: str, *, force: bool = False, progress: Callable[[int], None] | None = None, **options: Any
) -> dict[str, Any]:
    """plan + run, closing the source. options: see `plan` (target_format, dtype, max_shard_size, ...)."""
    p = plan(src, dst, direction, force=force, **options)
    try:
        return run(p, force, progress)
    finally:
        p.source.close()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: VmHWM of /proc/self/status. (getrusage's ru_maxrss also counts the parent's
    memory before exec: a CLI started from a large Python process would report that.)
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if os.uname().sysname == "Darwin" else rss * 1024  # macOS reports bytes, Linux KiB


@contextlib.contextmanager
def tuned_process() -> Iterator[None]:
    """Process-wide settings for a conversion, for a command's entry (not a library call):
    glibc malloc tuned for large short-lived buffers (for the rest of the process: arenas
    are made as threads first allocate, so set it before any starts), and no cyclic garbage
    collection within the block."""
    _tune_malloc()
    with _no_gc():
        yield


def _tune_malloc(arenas: int = 2) -> None:
    """glibc malloc for a stream of large, short-lived buffers (tensorstore's chunk buffers and
    ours): each tensorstore thread would get its own arena, in which freed buffers stay mapped
    (peak RSS +100 MiB with no live data), so two arenas; and buffers up to 32 MiB come from the
    heap and freed ones stay there for the next (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), instead of
    being unmapped and faulted in again, page by zeroed page (perf: 5-9% of a jax-to-torch
    conversion's CPU time, 130,000 page faults per GB). A no-op outside glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's largest)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No cyclic garbage collection within the block: the loop makes no cycles, and gc passes
    over the interpreter's objects cost 1-1.5% of a conversion's CPU time (perf)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
