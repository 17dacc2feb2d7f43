"""The synthetic sources of bench/convert.py, built one tensor at a time in a child process:

    python bench/convert_sources.py KIND PATH BYTES    # prints the source's description (JSON)

Synthetic checkpoints. Width 2048, MLP 8192, 16 heads, patch 14 (the `vit22b-1B/14` preset's
sizes), depth the smallest that makes the parameter bytes >= --size-gib: the ViT-22B-style
block (`vit22b-1B/14`, parallel, QK-norm, MAP head) for the vitctl-jax and vitctl-torch
sources, the classic big_vision ViT with the same sizes for the .npz sources (big_vision's
layout has no parallel block). The largest single tensor is one layer's MLP kernel, D*F*4 =
64 MiB. A *stacked* (L, D, F) tensor is L times that (1.3-1.5 GiB at 4 GiB). No width and
depth keep the largest stacked tensor of a 4 GiB model under ~256 MiB: one layer's six
block kernels (4*D*D + 2*D*F) are at most 6x its largest one, so it is >= 4 GiB / 6.
Only two places see stacked tensors: Orbax params/ (stored and read in per-layer chunks)
and the scanned .npz (one zip member per stacked tensor: `scan-torch`). Each source is
written tensor by tensor, with the project's streaming writers (OrbaxWriter,
SafetensorsWriter) or zipfile + numpy.lib.format one member at a time (stored, not
deflated, as np.savez), from a seeded numpy generator (standard normal: not compressible
beyond the float exponent bits). The writing runs in a child process, so that this
process stays small (see "Peak RSS").
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDTH, MLP_DIM, HEADS, PATCH = 2048, 8192, 16, 14  # vit22b-1B/14's sizes
SEED = 0
PROVENANCE = {"source_format": "synthetic", "created_by": "bench/convert.py", "seed": SEED}


@dataclasses.dataclass(frozen=True)
class SourceKind:
    label: str
    preset: str  # the block design; sizes are overridden
    dtype: str
    layout: str  # orbax (OCDBT) | orbax-files | safetensors | shards | npz | npz-scanned
    compress: bool = False  # orbax: zstd level 1 on every chunk, Orbax's own default (vitctl writes no compression)


SOURCES = {
    "jax": SourceKind("vitctl-jax (OCDBT, as init/train write)", "vit22b-1B/14", "float32", "orbax"),
    "jaxf": SourceKind("vitctl-jax (per-array files, as convert writes)", "vit22b-1B/14", "float32", "orbax-files"),
    "jaxz": SourceKind("Orbax default (OCDBT + zstd)", "vit22b-1B/14", "float32", "orbax", compress=True),
    "torch": SourceKind("vitctl-torch (model.safetensors)", "vit22b-1B/14", "float32", "safetensors"),
    "shards": SourceKind("vitctl-torch (HF shards)", "vit22b-1B/14", "float32", "shards"),
    "npz": SourceKind("big_vision .npz fp32", "L/14", "float32", "npz"),
    "npz16": SourceKind("big_vision .npz bf16", "L/14", "bfloat16", "npz"),
    "scan": SourceKind("big_vision .npz scanned fp32", "L/14", "float32", "npz-scanned"),
}


def _bench_config(kind: SourceKind, size_bytes: int):
    """The source's ViTConfig: the preset's block at WIDTH/MLP_DIM/HEADS, the smallest depth with >= size_bytes."""
    import numpy as np

    from vitctl.config import ViTConfig
    from vitctl.params import jax_param_shapes

    itemsize = 2 if kind.dtype == "bfloat16" else 4

    def cfg(depth: int) -> ViTConfig:
        return ViTConfig.from_variant(kind.preset, width=WIDTH, mlp_dim=MLP_DIM, num_heads=HEADS, patch_size=PATCH, depth=depth,
                                      param_dtype=kind.dtype)  # fmt: skip

    def nbytes(depth: int) -> int:
        return sum(int(np.prod(s)) for s in jax_param_shapes(cfg(depth)).values()) * itemsize

    per_layer = nbytes(2) - nbytes(1)
    depth = max(1, math.ceil((size_bytes - (nbytes(1) - per_layer)) / per_layer))
    return cfg(depth)


def _random(rng, shape, dtype):
    import ml_dtypes
    import numpy as np

    w = rng.standard_normal(shape, dtype=np.float32)
    return w.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else w


def _build_orbax(kind: SourceKind, path: Path, cfg, rng, dt) -> int:
    """Orbax params/ of `cfg`, one tensor at a time; returns the largest stored unit (a chunk)."""
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout
    from vitctl.formats.orbax import OrbaxWriter
    from vitctl.params import jax_param_shapes

    path.mkdir()
    specs = [(n, s, dt) for n, s in jax_param_shapes(cfg, stacked=False).items()]
    if kind.layout == "orbax":  # OCDBT, as Orbax saves it (vitctl init / train: uncompressed; Orbax's default: zstd)
        writer = OrbaxWriter(path / layout.PARAMS, specs, layout.CHUNK_BYTES, compress=kind.compress)
    else:  # as vitctl convert writes vitctl-jax: one directory per array, uncompressed
        writer = OrbaxWriter(path / layout.PARAMS, specs, layout.CHUNK_BYTES, compress=False, use_ocdbt=False)
    for n, s, _ in specs:
        writer.write(n, _random(rng, s, kind.dtype))
    writer.close()
    ckpt.write_config(path, cfg, PROVENANCE)
    return layout.CHUNK_BYTES


def _build_safetensors(kind: SourceKind, path: Path, cfg, rng, dt) -> int:
    """model.safetensors (or HF shards + index) in torch names and layouts; returns 0 (no stored units)."""
    import numpy as np

    from vitctl import checkpoint as ckpt
    from vitctl.formats.safetensors import SafetensorsWriter
    from vitctl.params import jax_param_shapes, rename

    path.mkdir()
    specs = []
    for n, s in jax_param_shapes(cfg, stacked=False).items():
        tname, layout = rename(n, "jax")
        specs.append((tname, tuple(layout.to_torch(np.broadcast_to(np.uint8(0), s)).shape), dt))
    total = sum(math.prod(s) for _, s, _ in specs) * dt.itemsize
    max_shard = math.ceil(total / 4) if kind.layout == "shards" else None  # 4-5 shards
    writer = SafetensorsWriter(path, specs, max_shard, {"format": "pt"})
    for tname, s, _ in specs:
        writer.write(tname, _random(rng, s, kind.dtype))
    writer.close()
    ckpt.write_config(path, cfg, PROVENANCE)
    return 0


def _npz_members(kind: SourceKind, cfg) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(big_vision key, shape, layers written one at a time or None) of every member."""
    from vitctl.convert import big_vision
    from vitctl.params import jax_param_shapes

    if kind.layout == "npz":
        return [(big_vision.to_big_vision(n), s, None) for n, s in jax_param_shapes(cfg, stacked=False).items()]
    members = []  # scanned: Transformer/encoderblock/... with a leading depth axis
    for n, s in jax_param_shapes(cfg, stacked=True).items():
        if n.startswith("blocks/"):
            bv = big_vision.to_big_vision(n.replace("blocks/", "blocks/0/", 1)).replace("encoderblock_0/", "encoderblock/")
            members.append((bv, s, s[0]))
        else:
            members.append((big_vision.to_big_vision(n), s, None))
    return members


def _build_npz(kind: SourceKind, path: Path, cfg, rng, dt) -> int:
    """A big_vision .npz: zip (stored) of .npy members in big_vision's key layout; returns the largest member."""
    import zipfile

    import numpy as np

    members = _npz_members(kind, cfg)
    assert all(m[0] for m in members), "a tensor without a big_vision name"
    stored = np.dtype("V2") if kind.dtype == "bfloat16" else dt  # np.save writes bfloat16 as raw 2-byte void
    largest = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, shape, layers in members:
            header = {"descr": np.lib.format.dtype_to_descr(stored), "fortran_order": False, "shape": tuple(shape)}
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for _ in range(layers or 1):
                    w = _random(rng, shape[1:] if layers else shape, kind.dtype)
                    f.write(w.view(np.uint8).reshape(-1))
            largest = max(largest, math.prod(shape) * dt.itemsize)
    return largest


def build(kind_key: str, path: Path, size_bytes: int) -> dict:
    """Writes one synthetic source at `path`, one tensor at a time; returns its description."""
    import ml_dtypes
    import numpy as np

    from vitctl.params import jax_param_shapes

    kind = SOURCES[kind_key]
    cfg = _bench_config(kind, size_bytes)
    dt = np.dtype(np.float32) if kind.dtype == "float32" else np.dtype(ml_dtypes.bfloat16)
    write = _build_orbax if kind.layout.startswith("orbax") else _build_npz if kind.layout.startswith("npz") else _build_safetensors
    largest_stored = write(kind, path, cfg, np.random.default_rng(SEED), dt)
    per_layer = jax_param_shapes(cfg, stacked=False)
    tensor_bytes = sum(math.prod(s) for s in per_layer.values()) * dt.itemsize
    largest = max(math.prod(s) for s in per_layer.values()) * dt.itemsize
    stacked = max(math.prod(s) for s in jax_param_shapes(cfg, stacked=True).values()) * dt.itemsize
    return {
        "config": f"{kind.preset} block, width {cfg.width}, depth {cfg.depth}, mlp {cfg.mlp_dim}, heads {cfg.num_heads}, "
        f"patch {cfg.patch_size}, {cfg.block}, pool {cfg.pool}, {kind.dtype}",
        "depth": cfg.depth, "tensors": len(per_layer), "tensor_bytes": tensor_bytes, "largest_tensor_bytes": largest,
        "largest_stacked_bytes": stacked, "largest_stored_unit_bytes": largest_stored or largest,
    }  # fmt: skip


if __name__ == "__main__":
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    kind, path, nbytes = sys.argv[1:]
    print(json.dumps(build(kind, Path(path), int(nbytes))))
