"""One door to a checkpoint, whatever its format: `open_checkpoint(path | hf://org/name[@rev])`.

It returns a `Checkpoint`: the detected format, the local path, the model config, and a
streaming reader (names, shapes and dtypes from headers alone; tensors one at a time).

    format        on disk                                        reader (naming)
    vitctl-jax    DIR/params/ (Orbax) + DIR/config.json          OrbaxReader (jax)
    vitctl-torch  DIR/model.safetensors or shards + index        SafetensorsReader (torch)
    timm          DIR/model.safetensors + timm's config.json     SafetensorsReader (timm's names)
    hf            DIR/model.safetensors + config.json (model_type "vit")  HfReader (torch)
    big_vision    FILE.npz (`prefix`: the sub-tree of the ViT)   BigVisionReader (jax)

- The format comes from the content (`detect`), never from a name: a zip file is a
  big_vision .npz; in a directory, params/_METADATA is JAX, safetensors are torch unless
  config.json is timm's (or its provenance says the directory is a timm export) or a
  Hugging Face transformers ViT's (model_type "vit").
- timm: vitctl's own export keeps its model config (config.json's `model`); another timm
  directory's is rebuilt from timm's keys and the tensors' shapes (convert.timm_import).
  hf: from config.json, preprocessor_config.json and the classifier's rows (convert.hf).
  Either refuses by name what vitctl's model cannot compute, and says what it assumed (notes).
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
from vitctl.params import MAX_TENSORS, check_count, check_coverage, jax_param_shapes, rename, torch_param_shapes
from vitctl.untrusted import read_json

JAX, TORCH, TIMM, HF, BIG_VISION = layout.JAX, layout.TORCH, layout.TIMM, layout.HF, "big_vision"
FORMATS = (TIMM, HF, JAX, TORCH, BIG_VISION)  # detection preference: a timm export is timm even beside params/
BACKENDS = {TORCH: "torch", TIMM: "timm", HF: "torch"}  # the model each format runs on; the rest run the JAX model


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
    fmt = next((f for f in formats_in(path) if f in (TIMM, HF)), None)
    if fmt is not None and not _has_vitctl_model(path):
        reader = SafetensorsReader(path)
        try:
            cfg, _, notes, _ = _foreign(path, fmt, reader, None)
        finally:
            reader.close()
        return cfg, notes
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
        want = [f for f in formats if f != BIG_VISION]
        also = f", nor {' or '.join(want[1:])} weights" if len(want) > 1 else ""
        raise CheckpointError(f"{path} holds no {want[0]} weights (found: {', '.join(found)}){also}", hint=other_hint or None)
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
        # Set to a list to record every slice read: (per-layer JAX name, index, bytes).
        self.read_log: list[tuple[str, tuple, int]] | None = None
        self._views: dict[str, np.ndarray] | None = None  # timm: torch name -> mapped view (fused tensors split)
        self._whole: dict[str, np.ndarray] | None = None  # formats without slice reads: every parameter, read once

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

    @functools.cached_property
    def _timm_owner(self) -> dict[str, str]:
        """timm: vitctl torch name -> the stored timm tensor it is a part of."""
        from vitctl.convert import timm

        return {s: t.name for t in timm.timm_tensor_plan(self.cfg) for s in t.sources}

    def info(self, hub_name: str) -> TensorInfo:
        if self.format == TIMM:  # a part of a fused tensor: the stored tensor's dtype and file, the part's shape
            stored = self.infos[self._timm_owner[self._names[hub_name]]]
            return dataclasses.replace(stored, shape=self.hub_shapes[hub_name], chunk_bytes=max(stored.nbytes, stored.chunk_bytes))
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

    def read_slice(self, hub_name: str, index: tuple = ()) -> np.ndarray:
        """`param[index]` of one parameter (per-layer JAX name, JAX layout and shape), reading
        only that slice where the format allows.

        safetensors (vitctl-torch, timm, hf): a slice of the file's map (pages read only when
        touched), re-laid out by the parameter's Layout.to_jax (transposes and reshapes, so
        views) and timm's fused tensors split by rows (views too). Orbax: tensorstore reads
        the stored chunks the slice touches. Other sources (a big_vision .npz, whose members
        are read in archive order) are read whole once, then sliced.
        """
        index = tuple(index)
        if hub_name not in self.hub_shapes:
            raise KeyError(hub_name)
        self.check_coverage()
        if self.reader.naming == "jax" and hasattr(self.reader, "read_slice"):
            out = self.reader.read_slice(hub_name, index)
        elif hasattr(self.reader, "view") and (self.format == TIMM or self.reader.naming == "torch"):
            out = np.array(self.jax_view(hub_name)[index])
        else:
            if self._whole is None:
                self._whole = self.params()
            out = np.array(self._whole[hub_name][index])
        if self.read_log is not None:
            self.read_log.append((hub_name, index, out.nbytes))
        return out

    def jax_view(self, hub_name: str) -> np.ndarray:
        """One parameter of a safetensors checkpoint in JAX layout, as a view of the mapped file (no data read)."""
        if self.format == TIMM:
            if self._views is None:
                from vitctl.convert import timm

                self._views = timm.from_timm_state_dict({n: self.reader.view(n) for n in self.infos}, self.cfg)
            name = self._names[hub_name]
            w = self._views[name]
        else:
            name = self._names[hub_name]
            w = self.reader.view(name)
        return rename(name, "torch")[1].to_jax(w, self.hub_shapes[hub_name])

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
    if fmt in (TIMM, HF):
        raw = SafetensorsReader(path)
        return _opened(raw, lambda: Checkpoint(fmt, path, *_foreign(path, fmt, raw, model)))
    cfg = model or layout.read_checkpoint_config(path)
    reader = OrbaxReader(path / layout.PARAMS) if fmt == JAX else SafetensorsReader(path)
    provenance = layout.read_provenance(path) if (path / layout.CONFIG).is_file() else {}
    return _opened(reader, lambda: Checkpoint(fmt, path, cfg, reader, [], provenance))


def _has_vitctl_model(path: Path) -> bool:
    """Whether config.json carries vitctl's own model config (a vitctl export), beside another library's keys."""
    with contextlib.suppress(VitctlError, OSError):
        return isinstance(read_json(path / layout.CONFIG, ConfigError).get("model"), dict)
    return False


def _foreign(path: Path, fmt: str, raw: SafetensorsReader, model: ViTConfig | None) -> tuple[ViTConfig, Reader, list[str], dict[str, Any]]:
    """(config, reader, notes, provenance) of a timm or Hugging Face directory.

    timm: vitctl's own export keeps its model config (config.json's `model`); any other is rebuilt
    from timm's keys and the tensors' shapes (vitctl.convert.timm_import). Its names and shapes are
    checked against the export table here, its fixed parts as they are read. HF: config.json's keys
    and the classifier's rows, read through HfReader under vitctl's torch names."""
    from vitctl.convert import hf, timm, timm_import

    hub = read_json(path / layout.CONFIG, ConfigError)
    if raw.count() > MAX_TENSORS:
        raise CheckpointError(
            f"{path} holds {raw.count():,} tensors; vitctl reads at most {MAX_TENSORS:,}", hint="no ViT has that many tensors"
        )
    shapes = {n: i.shape for n, i in raw.infos().items()}
    provenance = layout.read_provenance(path) if fmt == TIMM and _has_vitctl_model(path) else {"source_format": fmt}
    if fmt == TIMM:
        if model is None and _has_vitctl_model(path):
            cfg, notes = layout.read_checkpoint_config(path), []
        else:
            cfg, notes = timm_import.timm_config(hub, shapes) if model is None else (model, [])
            provenance["class_names"] = timm_import.class_names(hub, cfg.num_classes)
        check_count(raw.count(), cfg, f"{path} (timm)")
        check_coverage(shapes, timm.timm_param_shapes(cfg), f"{path} (timm)")
        return cfg, raw, notes, provenance
    prefix = hf.PREFIX if any(n.startswith(hf.PREFIX) for n in shapes) else ""
    head = shapes.get("classifier.weight", (0,))
    pre = path / layout.PREPROCESSOR
    preprocessor = read_json(CheckpointRoot(path).check(pre), ConfigError) if pre.is_file() else None
    cfg, notes = hf.hf_config(hub, preprocessor, head[0]) if model is None else (model, [])
    provenance["class_names"] = hf.class_names(hub, cfg.num_classes)
    reader = HfReader(raw, cfg, prefix)
    return cfg, reader, notes + reader.notes, provenance


def _opened(reader, make) -> Checkpoint:
    """make(), closing `reader` if its checks fail."""
    try:
        return make()
    except BaseException:
        reader.close()
        raise


class HfReader:
    """A Hugging Face ViT's safetensors under vitctl's torch names (the layouts are the same: a rename,
    vitctl.convert.hf). ViTModel's pooler (dense + tanh) is no part of vitctl's model: left out, noted."""

    naming = "torch"

    def __init__(self, raw: SafetensorsReader, cfg: ViTConfig, prefix: str):
        from vitctl.convert import hf

        self.raw, self.path = raw, raw.path
        stored = raw.infos()
        self.notes = [f"ViTModel's pooler ({', '.join(hf.POOLER)}: dense + tanh) is not part of vitctl's model: left out"] * any(
            n in stored for n in hf.POOLER
        )
        check_count(len(stored), cfg, f"{raw.path} (Hugging Face ViT)")
        self._names = {n: hf.hf_name(n, prefix) for n in torch_param_shapes(cfg)}  # vitctl torch name -> HF name
        expected = {self._names[n]: s for n, s in torch_param_shapes(cfg).items()}
        check_coverage({n: i.shape for n, i in stored.items() if n not in hf.POOLER}, expected, f"{raw.path} (Hugging Face ViT)")
        self._infos = {n: dataclasses.replace(stored[h], name=n) for n, h in self._names.items()}

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def count(self) -> int:
        return len(self._infos)

    def read(self, name: str) -> np.ndarray:
        return self.raw.read(self._names[name])

    def view(self, name: str) -> np.ndarray:
        return self.raw.view(self._names[name])

    def iter_tensors(self, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        yield from ((n, self.raw.read(self._names[n])) for n in names)

    def close(self) -> None:
        self.raw.close()


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
