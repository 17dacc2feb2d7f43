"""One door to a checkpoint, whatever its format: `open_checkpoint(path | hf://org/name[@rev])`.

It returns a `Checkpoint`: the detected format, the local path, the model config, and a
streaming reader (names, shapes and dtypes from headers alone; tensors one at a time).

    format        on disk                                        reader (naming)
    vitctl-jax    DIR/params/ (Orbax) + DIR/config.json          OrbaxReader (jax)
    vitctl-torch  DIR/model.safetensors or shards + index        SafetensorsReader (torch)
    timm          DIR/model.safetensors + timm's config.json     SafetensorsReader (timm's names)
    big_vision    FILE.npz (`prefix`: the sub-tree of the ViT)   BigVisionReader (jax)

- The format comes from the content (`detect`), never from a name: a zip file is a
  big_vision .npz; in a directory, params/_METADATA is JAX, safetensors are torch unless
  config.json is timm's (or its provenance says the directory is a timm export).
- `hf://org/name[@rev]` is fetched into the Hugging Face cache by vitctl.hub (only the
  weights `fetch` names) and opened there (`locate`).
- Before a tensor is read, config.json must lie inside the checkpoint, and the header's
  tensor count must fit the config (params.check_count): a small hostile config cannot
  make vitctl list millions of names. `check_coverage` then compares every name and shape.
- `iter_hub` hands out every parameter under per-layer JAX names (`blocks/{i}/q/kernel`),
  re-laid out from torch or timm names where needed: the one naming the apps compare,
  convert and load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, ConfigError, VitctlError
from vitctl.formats import layout
from vitctl.formats.base import CheckpointRoot, Reader, TensorInfo
from vitctl.formats.orbax import OrbaxReader
from vitctl.formats.safetensors import INDEX, SAFETENSORS, SafetensorsReader
from vitctl.params import check_count, check_coverage, jax_param_shapes, rename, torch_param_shapes

JAX, TORCH, TIMM, BIG_VISION = layout.JAX, layout.TORCH, layout.TIMM, "big_vision"
FORMATS = (TIMM, JAX, TORCH, BIG_VISION)  # detection preference: a timm export is timm even beside params/
BACKENDS = {TORCH: "torch", TIMM: "timm"}  # the model each format runs on; the rest run the JAX model


def locate(where: str | os.PathLike, *, fetch: str = "all", must_exist: bool = False) -> Path:
    """The local path of a checkpoint argument: a path as given, `hf://...` fetched (only what
    `fetch` names: config, jax, torch or all) and returned as its cache snapshot."""
    from vitctl import hub

    return hub.resolve_checkpoint(where, backend=fetch, must_exist=must_exist)


def read_config(path: Path) -> tuple[ViTConfig, list[str]]:
    """The model config of a checkpoint directory (its config.json, whether or not weights sit
    beside it) or of a big_vision .npz (inferred from its member headers, as convert does),
    with the notes on what the weights cannot confirm."""
    if path.is_file():
        from vitctl.convert import big_vision

        plan = big_vision.plan(path)
        return plan.cfg, list(plan.notes)
    return layout.read_checkpoint_config(path), []


def formats_in(path: Path) -> list[str]:
    """The weight sets a directory holds (layout.detect_formats), with safetensors that
    config.json's provenance calls a timm export counted as timm."""
    found = layout.detect_formats(path)
    if TORCH in found and (path / layout.CONFIG).is_file():
        with contextlib.suppress(VitctlError, OSError):
            if layout.read_provenance(path).get("target_format") == TIMM:
                found[found.index(TORCH)] = TIMM
    return found


def detect(path: Path, formats: Sequence[str] = FORMATS, *, doing: str = "vitctl", other_hint: str = "") -> str:
    """The format of the checkpoint at `path` among `formats` (in preference order), from its content.

    `doing` names the command in the refusal of a timm export it cannot read; `other_hint` is
    the hint when the directory holds weights, but none of `formats`."""
    if path.is_file():
        if zipfile.is_zipfile(path) and BIG_VISION in formats:
            return BIG_VISION
        what = "an .npz (zip) file" if BIG_VISION in formats else "a checkpoint directory"
        raise CheckpointError(f"{path} is not {what}", hint="SRC is a checkpoint directory (config.json + weights) or a big_vision .npz")
    found = formats_in(path)
    if TIMM in found and TIMM not in formats:
        raise layout.timm_export_error(path, doing)
    if not found:
        raise CheckpointError(
            f"{path} holds no weights: neither {layout.PARAMS}/ (a JAX checkpoint: params/_METADATA) nor {SAFETENSORS} or {INDEX} (a PyTorch checkpoint)",
            hint=f"a checkpoint directory holds config.json and its weights; check the path, or {layout.INIT_HINT}",
        )
    usable = [f for f in formats if f in found]
    if not usable:
        want = " or ".join(f for f in formats if f != BIG_VISION)
        raise CheckpointError(f"{path} holds no {want} weights (found: {', '.join(found)})", hint=other_hint or None)
    return usable[0]


@dataclasses.dataclass
class Checkpoint:
    """An open checkpoint: its format, local path, model config and reader (close it, or use `with`)."""

    format: str  # vitctl-jax, vitctl-torch, timm, big_vision
    path: Path
    cfg: ViTConfig
    reader: Reader
    notes: list[str] = dataclasses.field(default_factory=list)  # assumptions the weights cannot confirm
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # config.json's, {} for an .npz

    def __post_init__(self):
        check_count(self.reader.count(), self.cfg, self.what)  # before any per-layer name is listed
        self.infos: dict[str, TensorInfo] = self.reader.infos()  # in the reader's naming
        self._covered = False

    @property
    def what(self) -> str:
        return f"{self.path} ({self.format})"

    @property
    def backend(self) -> str:
        """The model this checkpoint runs on by default: jax, torch or timm."""
        return BACKENDS.get(self.format, "jax")

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @functools.cached_property
    def hub_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-layer JAX name -> shape of every parameter the config implies."""
        return jax_param_shapes(self.cfg, stacked=False)

    @functools.cached_property
    def _names(self) -> dict[str, str]:
        """Per-layer JAX name -> the reader's name."""
        return {h: h if self.reader.naming == "jax" else rename(h, "jax")[0] for h in self.hub_shapes}

    def check_coverage(self) -> None:
        """Every tensor the config implies is there, under its name, with its shape (headers only)."""
        if self._covered or self.format == TIMM:  # timm: its fused tensors are checked as they are split
            return
        got = {n: i.shape for n, i in self.infos.items()}
        expected = self.hub_shapes if self.reader.naming == "jax" else torch_param_shapes(self.cfg)
        check_coverage(got, expected, self.what)
        self._covered = True

    def info(self, hub_name: str) -> TensorInfo:
        return self.infos[self._names[hub_name]]

    def iter_hub(self) -> Iterator[tuple[str, np.ndarray]]:
        """(per-layer JAX name, array with that shape) for every parameter, each read once."""
        if self.format == TIMM:
            yield from self._iter_timm()
            return
        self.check_coverage()
        from vitctl.formats import fastcopy

        tensors = self.reader.iter_tensors(list(self._names.values()))
        if not isinstance(self.reader, OrbaxReader):  # (which reads ahead on its own threads)
            tensors = fastcopy.read_ahead(tensors)
        if self.reader.naming == "jax":
            yield from tensors
            return
        for name, w in tensors:
            hub, form = rename(name, "torch")
            out = form.to_jax(w, self.hub_shapes[hub])
            del w  # hold one tensor, not two, while the next one is read
            yield hub, out
            del out

    def _iter_timm(self) -> Iterator[tuple[str, np.ndarray]]:
        """timm's fused tensors are split whole (mapped views of the file, no copy), then renamed."""
        from vitctl.convert import timm

        state = timm.from_timm_state_dict({n: self.reader.read(n) for n in self.infos}, self.cfg)
        for name, w in state.items():
            hub, form = rename(name, "torch")
            yield hub, form.to_jax(w, self.hub_shapes[hub])

    def params(self) -> dict[str, np.ndarray]:
        """Every parameter under per-layer JAX names, read whole."""
        return dict(self.iter_hub())

    def files(self) -> list[Path]:
        """The files whose bytes define the checkpoint's function: config.json and its weight
        files (an .npz: itself), each checked to lie inside the checkpoint."""
        if self.path.is_file():
            return [self.path]
        root = self.path
        files = [root / layout.CONFIG]
        if self.format == JAX:
            files += sorted(p for p in (root / layout.PARAMS).rglob("*") if p.is_file())
        else:
            index = root / layout.SAFETENSORS_INDEX
            files += sorted(root.glob("model*.safetensors")) + ([index] if index.is_file() else [])
        checked = CheckpointRoot(root)  # inside the checkpoint (or its HF cache blobs)
        return [checked.check(f) for f in files]

    def check_memory(self, label: str) -> None:
        """For a caller that holds the parameters whole and copies them once into a model:
        refuses, with the numbers, what cannot fit this machine's memory."""
        from vitctl import untrusted

        nbytes = self.nbytes
        untrusted.require_memory(
            2 * nbytes,
            f"{label}: {self.path} holds {nbytes / 2**20:,.1f} MiB of parameters; running it",
            hint="run it on a machine with more memory",
        )

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    where: str | os.PathLike, *, fmt: str | None = None, model: ViTConfig | None = None, prefix: str | None = None,
    fetch: str = "all", label: str | None = None,
) -> Checkpoint:  # fmt: skip
    """Opens a checkpoint directory, a big_vision .npz or `hf://org/name[@rev]`; reads headers only.

    Args:
        fmt: the format, if not detected from the content (`detect`).
        model: the model config; default: config.json's (an .npz: inferred from its shapes).
        prefix: big_vision .npz only: the sub-tree holding the ViT (e.g. params/img).
        fetch: for hf://, which weights to download: config, jax, torch or all.
        label: names the checkpoint in a missing-path error (verify's A and B).
    """
    path = locate(where, fetch=fetch)
    if not path.exists():
        raise ConfigError(
            f"{label or 'checkpoint'}: no such file or directory: {path}", hint="give a checkpoint directory or a big_vision .npz"
        )
    fmt = fmt or detect(path)
    if fmt == BIG_VISION:
        reader = BigVisionReader(path, model, prefix)
        return _opened(reader, lambda: Checkpoint(BIG_VISION, path, reader.plan.cfg, reader, list(reader.plan.notes)))
    if prefix is not None:
        raise ConfigError("--prefix applies to big_vision .npz sources only")
    if (path / layout.CONFIG).exists():
        CheckpointRoot(path).check(path / layout.CONFIG)
    cfg = model or layout.read_checkpoint_config(path)
    reader = OrbaxReader(path / layout.PARAMS) if fmt == JAX else SafetensorsReader(path)
    provenance = layout.read_provenance(path) if (path / layout.CONFIG).is_file() else {}
    return _opened(reader, lambda: Checkpoint(fmt, path, cfg, reader, [], provenance))


def _opened(reader, make) -> Checkpoint:
    """make(), closing `reader` if its checks fail."""
    try:
        return make()
    except BaseException:
        reader.close()
        raise


class BigVisionReader:
    """A big_vision .npz through vitctl.convert.big_vision, as an Reader in JAX per-layer naming.

    It reads in archive order, one member at a time: a scanned member (L, ...) is read
    once and its L layers handed out back to back.
    """

    naming = "jax"

    def __init__(self, path: Path, cfg: ViTConfig | None, prefix: str | None):
        from vitctl.convert import big_vision

        self.path = path
        self._npz = big_vision.NpzReader(path)
        try:
            self.plan = big_vision.plan(self._npz, cfg, prefix)
            member = {e.key: self._npz.held_bytes(e.key, e.index is not None) for e in self.plan.entries}
        except BaseException:
            self._npz.close()
            raise
        self._infos = {e.name: TensorInfo(e.name, e.shape, e.dtype, path, member[e.key]) for e in self.plan.entries}

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def count(self) -> int:
        return len(self._infos)

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        assert set(names) == set(self._infos), "a big_vision source is read whole, in archive order"
        yield from self.plan.iter_tensors(self._npz)

    def close(self) -> None:
        self._npz.close()
