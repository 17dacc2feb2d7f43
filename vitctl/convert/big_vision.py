"""big_vision `.npz` checkpoints as a source for `vitctl convert`: lazy reads, config inference, one key table.

numpy (and ml_dtypes) only. What a big_vision `.npz` is (google-research/big_vision, models/vit.py
and utils.py):
- a zip of `.npy` members, one per parameter, named by `utils.tree_flatten_with_names`: the flax
  params tree "/"-joined (`Transformer/encoderblock_3/MlpBlock_0/Dense_1/kernel`). Training
  checkpoints wrap it as `params/...` (or, older, `opt/target/...`); two-tower models (SigLIP)
  hold the image tower under `params/img/...` beside `params/txt/...`.
- bfloat16 arrays come back from `np.load` as raw 2-byte void (`|V2`); big_vision's
  `recover_dtype` reinterprets them, and so do we (ml_dtypes.bfloat16, no float32 detour).
- `Encoder(scan=True)` wraps the block in `nn.scan(variable_axes={"params": 0})`: one
  `Transformer/encoderblock/...` tree whose every leaf has a leading depth axis (L, ...).
- Every kernel already has vitctl's JAX layout: the `embedding` conv kernel is HWIO (P, P, C, D),
  flax `MultiHeadDotProductAttention` keeps query/key/value kernels as (D, N, K), biases as
  (N, K) and the `out` kernel as (N, K, D), dense kernels are (in, out). So every row of the
  table is a rename, and shapes are checked against `params.jax_param_shapes`.
- The function matches vitctl's classic config (sequential block, LayerNorm eps 1e-6 with bias,
  tanh GELU, position embedding added before the class token, final norm before pooling, MAP
  head with the encoder's heads and mlp_dim and no norm before its attention) to < 1e-6 in fp32
  (tests/convert/test_big_vision.py). One difference with bfloat16 *parameters*: big_vision's
  MAPHead attention has no `dtype`, so flax computes the probe's query projection in bf16
  (probe and kernel both bf16); vitctl casts to the compute dtype first (logits ~1e-3 apart).
- Not representable, refused by name (UNSUPPORTED): `rep_size`'s `pre_logits` layer, pre-2022
  layouts that big_vision itself repairs in `vit.fix_old_checkpoints`. pool_type "none" stores
  the same keys as "gap" (pass overrides={"pool": "none"}); "0" (token 0 without a class
  token) has no vitctl equivalent and cannot be told apart from "gap" by its keys.

Reading: `vitctl.formats.npz.NpzReader` reads member headers without their data and one member
at a time; a scanned member (L, ...) is read one layer at a time, so the peak memory is one layer.

Public API: `open_npz`, `NpzReader`, `resolve_prefix`, `infer_config`, `plan` -> `Plan`
(entries, shapes, `iter_tensors`), `iter_jax_tensors`, `to_vitctl`, `to_big_vision`.

Shapes: D width, N heads, K head_dim, F mlp_dim, L depth, P patch, C channels, T tokens.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitctl import params
from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError
from vitctl.formats.npz import BFLOAT16, NpzReader

Shapes = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # npz key -> (shape, dtype), from headers


def open_npz(path: str | Path) -> NpzReader:
    """Opens a big_vision `.npz` lazily (see NpzReader)."""
    return NpzReader(path)


# --- The key table ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    big_vision: str  # name under the prefix, per layer (scanned trees are unstacked first)
    vitctl: str  # vitctl JAX per-layer name (params.jax_param_shapes(cfg, stacked=False))


def _attention_mlp(bv: str, ours: str) -> tuple[Row, ...]:
    """Rows shared by an encoder block and the MAP head (flax module names, auto-numbered)."""
    attn = {"query": "q", "key": "k", "value": "v", "out": "attn_out"}  # MultiHeadDotProductAttention's DenseGenerals
    return (
        Row(f"{bv}LayerNorm_0/{{ln}}", f"{ours}norm/{{ln}}"),
        *(Row(f"{bv}MultiHeadDotProductAttention_0/{a}/{{dense}}", f"{ours}{b}/{{dense}}") for a, b in attn.items()),
        Row(f"{bv}MlpBlock_0/Dense_0/{{dense}}", f"{ours}mlp_in/{{dense}}"),
        Row(f"{bv}MlpBlock_0/Dense_1/{{dense}}", f"{ours}mlp_out/{{dense}}"),
    )


KEY_MAP: tuple[Row, ...] = (
    #   big_vision (models/vit.py _Model)          vitctl JAX
    Row("embedding/{dense}", "patch_embed/proj/{dense}"),  # nn.Conv kernel HWIO (P, P, C, D)
    Row("pos_embedding", "pos_embed"),  # (1, h*w, D): no class-token slot, added before cls
    Row("cls", "cls_token"),  # pool_type "tok" only
    *_attention_mlp("Transformer/encoderblock_{i}/", "blocks/{i}/"),
    Row("Transformer/encoderblock_{i}/LayerNorm_1/{ln}", "blocks/{i}/mlp_norm/{ln}"),
    Row("Transformer/encoder_norm/{ln}", "norm/{ln}"),  # applied before pooling
    Row("MAPHead_0/probe", "map_head/probe"),  # (1, 1, D)
    *_attention_mlp("MAPHead_0/", "map_head/"),  # no norm before its attention
    Row("head/{dense}", "head/{dense}"),
)
# Slot values are the same on both sides; they match one path component each.
KEYS = params.NameTable(KEY_MAP, {"big_vision": "big_vision", "vitctl": "vitctl"}, {"dense": "kernel|bias", "ln": "scale|bias"})

# Keys big_vision can write that vitctl's models cannot hold: a clear refusal, not a silent drop.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"pre_logits/(kernel|bias)", "big_vision's `rep_size` pre-logits layer (Dense + tanh before the head), which vitctl's models do not have"),
    (r"Transformer/(posembed_input/)?pos_embedding", "an old ViT layout (position embedding inside Transformer); load it with big_vision's vit.fix_old_checkpoints and re-save"),
    (r"Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_1|LayerNorm_2|MlpBlock_3)/.*",
     "pre-linen module numbering (google-research/vision_transformer); renumber with big_vision's vit.fix_old_checkpoints and re-save"),
    (r"(probe|MultiHeadDotProductAttention_0/.*|MlpBlock_0/.*|LayerNorm_0/.*)", "an inlined MAP head (ViT-G era); load it with big_vision's vit.fix_old_checkpoints and re-save"),
)  # fmt: skip
SCANNED = re.compile(r"Transformer/encoderblock/(.+)")  # nn.scan: one tree, leading depth axis
WRAPPERS = ("params/", "opt/target/")  # what big_vision's utils.load_params unwraps by itself


def _rename(name: str, src: str) -> str | None:
    dst = "vitctl" if src == "big_vision" else "big_vision"
    hits = KEYS.matches(name, src)
    assert len(hits) <= 1, f"{name} matches {len(hits)} rows of the big_vision key table"
    return KEYS.fill(hits[0][0], dst, hits[0][1]) if hits else None


def to_vitctl(name: str) -> str | None:
    """A big_vision per-layer name (under the prefix) -> vitctl's JAX name; None if no row matches."""
    return _rename(name, "big_vision")


def to_big_vision(name: str) -> str | None:
    """A vitctl JAX per-layer name -> big_vision's name; None if big_vision has no such tensor."""
    return _rename(name, "vitctl")


def _unsupported(name: str) -> str | None:
    return next((why for pattern, why in UNSUPPORTED if re.fullmatch(pattern, name)), None)


# --- Prefix and config inference ------------------------------------------------------------

_EMBED = "embedding/kernel"


def resolve_prefix(keys: Iterable[str], prefix: str | None = None) -> str:
    """The sub-tree holding the ViT: "" (bare keys), "params/", "params/img/", ...

    With prefix=None: the one sub-tree with an `embedding/kernel`, if it is the root or one of
    big_vision's own wrappers (`params/`, `opt/target/`). Several towers (SigLIP's
    `params/img` beside `params/txt`) need an explicit prefix: a ConfigError lists candidates.
    """
    keys = list(keys)
    roots = sorted({k[: -len(_EMBED)] for k in keys if k == _EMBED or k.endswith("/" + _EMBED)})
    if prefix is not None:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if not any(k.startswith(prefix) for k in keys):
            listed = ", ".join(repr(r.rstrip("/")) for r in roots) or "none found"
            raise ConfigError(f"no key of the checkpoint starts with prefix '{prefix}'", hint=f"ViT sub-trees in this checkpoint: {listed}")
        return prefix
    if len(roots) == 1 and roots[0] in ("", *WRAPPERS):
        return roots[0]
    if not roots:
        raise CheckpointError(
            f"no big_vision ViT in this checkpoint: no key ends with '{_EMBED}'",
            hint=f"its keys start {', '.join(sorted({k.split('/')[0] for k in keys})[:8])}; pass --prefix if the ViT lives under another name",
        )
    tops = sorted({"/".join(k.split("/")[:2]) for k in keys if k.startswith(WRAPPERS)} or {k.split("/")[0] for k in keys})
    raise ConfigError(
        f"the checkpoint holds several sub-trees ({', '.join(tops[:8])}); which one is the image model is ambiguous",
        hint=f"pass --prefix, one of: {', '.join(r.rstrip('/') for r in roots)}",
    )


# Constants of big_vision's ViT that the weights cannot show (flax defaults and vit.py's structure).
BIG_VISION = {
    "block": "sequential",  # Encoder1DBlock: x + MHSA(LN(x)), then x + MLP(LN(x))
    "qk_norm": False,
    "norm": "layernorm",  # flax nn.LayerNorm: centered, with bias ...
    "norm_eps": 1e-6,  # ... epsilon=1e-6
    "gelu_approximate": True,  # flax nn.gelu(approximate=True): the tanh form
    "softmax_dtype": "float32",
    "head_zero_init": True,  # _Model.head_zeroinit default (init only)
}
# (config field, big_vision key under the prefix, per-layer shape -> value); {block} is
# `Transformer/encoderblock_0` or, scanned, `Transformer/encoderblock` (shapes then lead with L).
SIZES = (
    ("width", "embedding/kernel", lambda s: s[3]),  # (P, P, C, D)
    ("patch_size", "embedding/kernel", lambda s: s[0]),
    ("channels", "embedding/kernel", lambda s: s[2]),
    ("num_heads", "{block}/MultiHeadDotProductAttention_0/query/kernel", lambda s: s[-2]),  # (D, N, K)
    ("mlp_dim", "{block}/MlpBlock_0/Dense_0/kernel", lambda s: s[-1]),  # (D, F)
)
BIASES = (
    ("qkv_bias", "{block}/MultiHeadDotProductAttention_0/query/bias"),
    ("attn_out_bias", "{block}/MultiHeadDotProductAttention_0/out/bias"),
    ("mlp_bias", "{block}/MlpBlock_0/Dense_0/bias"),
    ("norm_bias", "{block}/LayerNorm_0/bias"),
)
SINCOS_IMAGE_SIZE = 224  # sincos checkpoints store no position embedding, hence no image size


def infer_config(
    shapes: Shapes, prefix: str | None = None, *, overrides: Mapping[str, Any] | None = None, notes: list[str] | None = None
) -> ViTConfig:
    """The ViTConfig of a big_vision ViT, from its keys and header shapes alone.

    Args:
      shapes: {npz key: (shape, dtype)}, as from NpzReader.shapes().
      prefix: the ViT's sub-tree (see resolve_prefix); None to detect it.
      overrides: config fields to set on top (e.g. image_size for a sincos model).
      notes: if a list, assumptions the weights cannot confirm are appended to it.
    Returns:
      The config; pool "map" if MAPHead_0 exists, "tok" if `cls` does, else "gap" (big_vision's
      rarer pool types "none" and "0" store the same keys as "gap"; see the module docstring).
    """
    notes = notes if notes is not None else []
    prefix = resolve_prefix(shapes, prefix)
    rel = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    if _EMBED not in rel:
        raise CheckpointError(f"no '{prefix}{_EMBED}' in the checkpoint", hint="pass the --prefix of the image model's sub-tree")
    block, depth = _blocks(rel, prefix)
    fields: dict[str, Any] = dict(BIG_VISION, depth=depth)
    for field, key, get in SIZES:
        key = key.format(block=block)
        if key not in rel:
            raise CheckpointError(
                f"the checkpoint has no '{prefix}{key}', which big_vision's ViT always has",
                hint="check --prefix and that this is a ViT checkpoint",
            )
        fields[field] = int(get(rel[key][0]))
    P = rel[_EMBED][0]
    if P[0] != P[1]:
        raise CheckpointError(f"non-square patches {P[:2]} are not supported")
    fields.update({field: key.format(block=block) in rel for field, key in BIASES})
    fields["pool"] = "map" if "MAPHead_0/probe" in rel else "tok" if "cls" in rel else "gap"
    fields["num_classes"] = int(rel["head/kernel"][0][-1]) if "head/kernel" in rel else 0
    fields.update(_posemb(rel, fields["patch_size"], "image_size" in (overrides or {}), notes))
    floats = {np.dtype(dt) for k, (_, dt) in rel.items() if np.dtype(dt).kind == "f" or np.dtype(dt) == BFLOAT16}
    fields["param_dtype"] = "bfloat16" if floats == {BFLOAT16} else "float32"
    if floats - {BFLOAT16, np.dtype(np.float32)}:
        notes.append(f"parameter dtypes {sorted(map(str, floats))}: the config says float32")
    notes.append("preprocessing assumed big_vision's usual value_range(-1, 1), bilinear resize; the checkpoint does not record it")
    fields.update(overrides or {})
    try:
        return ViTConfig(**fields)
    except TypeError as e:  # an unknown override field
        raise ConfigError(f"invalid config override: {e}") from None


def _blocks(rel: Shapes, prefix: str) -> tuple[str, int]:
    """(the first block's key prefix, depth): `Transformer/encoderblock` if scanned, else `..._0`."""
    scanned = any(SCANNED.fullmatch(k) for k in rel)
    layers = {int(m.group(1)) for k in rel if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    if scanned and layers:
        raise CheckpointError(
            f"the checkpoint has both scanned (Transformer/encoderblock/) and per-layer (Transformer/encoderblock_{{i}}/) blocks under '{prefix}'"
        )
    if scanned:
        depths = {rel[k][0][0] if rel[k][0] else 0 for k in rel if SCANNED.fullmatch(k)}
        if len(depths) != 1:
            raise CheckpointError(f"scanned blocks disagree on the depth (leading axis): {sorted(depths)}")
        return "Transformer/encoderblock", depths.pop()
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise CheckpointError(f"encoder blocks are not numbered 0..L-1 under '{prefix}': found {sorted(layers)}")
    return "Transformer/encoderblock_0", len(layers)


def _posemb(rel: Shapes, patch_size: int, image_size_given: bool, notes: list[str]) -> dict[str, Any]:
    """posemb and image_size: a learned table's token count gives the grid; sincos stores nothing."""
    if "pos_embedding" not in rel:
        if not image_size_given:
            notes.append(
                f"no pos_embedding: sincos2d position embedding, image size unknown; assumed {SINCOS_IMAGE_SIZE} (set image_size to change it)"
            )
        return {"posemb": "sincos2d", "image_size": SINCOS_IMAGE_SIZE}
    T = rel["pos_embedding"][0][1]
    g = math.isqrt(T)
    if g * g != T:
        old = math.isqrt(T - 1) ** 2 == T - 1  # old vit.py: cls concatenated first, then the posemb added
        raise CheckpointError(
            f"pos_embedding has {T} tokens, not a square grid" + (": an old layout with a class-token slot (h*w + 1)" if old else ""),
            hint="load it with big_vision's vit.fix_old_checkpoints and re-save" if old else "only square patch grids are supported",
        )
    return {"posemb": "learn", "image_size": g * patch_size}


# --- The plan: every tensor's name, source and shape, before any data is read ----------------


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # vitctl JAX per-layer name, e.g. "blocks/3/q/kernel"
    key: str  # npz array name (with the prefix)
    index: int | None  # the layer sliced out of a scanned (L, ...) member, else None
    shape: tuple[int, ...]  # of the produced tensor
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `iter_tensors` will produce, checked for coverage against `cfg`; no data read yet."""

    path: Path
    prefix: str
    cfg: ViTConfig
    entries: tuple[Entry, ...]  # in archive order; a scanned member's layers are adjacent
    ignored: tuple[str, ...]  # npz keys outside the prefix (another tower, optimizer state)
    notes: tuple[str, ...]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{vitctl JAX per-layer name: (shape, dtype)}."""
        return {e.name: (e.shape, e.dtype) for e in self.entries}

    def iter_tensors(self, reader: NpzReader | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(vitctl JAX per-layer name, array) for every entry, reading each member once.

        Arrays keep the stored dtype (bfloat16 stays bfloat16). Peak memory: one member; for a
        scanned checkpoint that is one stacked (L, ...) tensor, whose layer views are yielded.
        """
        own = reader is None
        reader = reader or NpzReader(self.path)
        try:
            key, array, layers, w = None, None, None, None
            for e in self.entries:
                if e.key != key:
                    key, array, layers, w = e.key, None, None, None  # drop the previous member before reading the next
                    if e.index is None:
                        array = reader.read(e.key)
                    else:
                        layers, expect = reader.iter_layers(e.key), 0
                if e.index is None:
                    w = array
                else:
                    assert e.index == expect, (e.key, e.index, expect)  # plan() lists a member's layers in order
                    w, expect = None, expect + 1
                    w = next(layers, None)
                    if w is None:
                        raise CheckpointError(f"{self.path}: member '{e.key}' changed while reading: fewer than {expect} layers")
                if w.shape != e.shape or w.dtype != e.dtype:
                    raise CheckpointError(
                        f"{self.path}: member '{e.key}' changed while reading: {w.shape} {w.dtype}, planned {e.shape} {e.dtype}"
                    )
                yield e.name, w
                w = None
        finally:
            if own:
                reader.close()


def plan(
    source: str | Path | NpzReader,
    cfg: ViTConfig | None = None,
    prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Plan:
    """Maps every npz key under the prefix to vitctl tensors and checks coverage, from headers only.

    Args:
      source: the `.npz` path, or an open NpzReader.
      cfg: the model config (--model / --config); None to infer it (infer_config).
      prefix: the ViT's sub-tree; None to detect it (resolve_prefix).
      overrides: config fields replaced on top of cfg or the inferred config.
    Raises:
      UnmappedParamError: a key that matches no row of KEY_MAP (all of them named), a key of a
        layer vitctl cannot hold (pre_logits), or a tensor cfg expects that is missing, produced
        twice or of the wrong shape.
    """
    reader = source if isinstance(source, NpzReader) else NpzReader(source)
    try:
        shapes = reader.shapes()
    finally:
        if reader is not source:
            reader.close()
    notes: list[str] = []
    prefix = resolve_prefix(shapes, prefix)
    if cfg is None:
        cfg = infer_config(shapes, prefix, overrides=overrides, notes=notes)
    elif overrides:
        cfg = ViTConfig.from_dict({**cfg.to_dict(), **overrides})
    produced = sum(
        (shape[0] if shape else 1) if SCANNED.fullmatch(k[len(prefix) :]) else 1 for k, (shape, _) in shapes.items() if k.startswith(prefix)
    )
    params.check_count(produced, cfg, f"the big_vision checkpoint {reader.path}")  # before listing a name per layer
    ignored = tuple(k for k in shapes if not k.startswith(prefix))
    if ignored:
        notes.append(f"{len(ignored)} arrays outside '{prefix}' ignored (e.g. {ignored[0]})")
    entries = _entries(shapes, prefix, reader.path)
    _check_coverage(entries, cfg, reader.path, prefix)
    return Plan(Path(reader.path), prefix, cfg, tuple(entries), ignored, tuple(notes))


def _entries(shapes: Shapes, prefix: str, path: Path) -> list[Entry]:
    """One Entry per vitctl tensor under `prefix` (a scanned member gives one per layer), in archive
    order; keys vitctl cannot hold (UNSUPPORTED) or that match no row are refused, all named."""
    entries, unmapped, unsupported = [], [], []
    for key, (shape, dtype) in shapes.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if m := SCANNED.fullmatch(name):  # unstack: the table speaks per layer
            if not shape:
                raise CheckpointError(f"{path}: scanned member '{key}' is a scalar, expected a leading depth axis")
            per_layer = [(f"Transformer/encoderblock_{i}/{m.group(1)}", i, shape[1:]) for i in range(shape[0])]
        else:
            per_layer = [(name, None, shape)]
        for bv_name, index, s in per_layer:
            if (ours := to_vitctl(bv_name)) is not None:
                entries.append(Entry(ours, key, index, tuple(s), np.dtype(dtype)))
            elif why := _unsupported(bv_name):
                unsupported.append(f"'{key}': {why}")
            else:
                unmapped.append(key)
            if index is not None and ours is None:
                break  # one message per scanned member, not L
    if unsupported:
        raise UnmappedParamError(
            f"{path} holds tensors vitctl's models cannot represent: " + "; ".join(unsupported[:4]),
            hint="convert a checkpoint without them, or drop them knowingly (e.g. re-save the npz without pre_logits/* to keep the features without the pre-logits layer)",
        )
    if unmapped:
        raise UnmappedParamError(
            f"{path}: {len(unmapped)} key(s) match no row of the big_vision key table: {', '.join(repr(k) for k in unmapped[:8])}{' ...' if len(unmapped) > 8 else ''}",
            hint=f"vitctl reads big_vision's models/vit.py layout under prefix '{prefix}'; pass --prefix if the ViT lives in a sub-tree",
        )
    return entries


def _check_coverage(entries: list[Entry], cfg: ViTConfig, path: Path, prefix: str) -> None:
    """Every expected tensor produced once with its shape; missing ones named in big_vision terms."""
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise UnmappedParamError(f"{path}: '{e.name}' would be produced twice, from '{seen[e.name]}' and '{e.key}'")
        seen[e.name] = e.key
    expected = params.jax_param_shapes(cfg, stacked=False)
    got = {e.name: e.shape for e in entries}
    missing = [n for n in expected if n not in got]
    if missing:
        named = [f"'{prefix}{b}'" if (b := to_big_vision(n)) else f"{n} (no big_vision equivalent)" for n in missing]
        raise UnmappedParamError(
            f"{path}: missing {len(missing)} tensor(s) the config needs: {', '.join(named[:8])}{' ...' if len(named) > 8 else ''}",
            hint="the checkpoint is incomplete, or the config (--model/--config) does not describe it; omit both to infer the config",
        )
    params.check_coverage(got, expected, f"the big_vision checkpoint {path}")


def iter_jax_tensors(
    path: str | Path, cfg: ViTConfig | None = None, prefix: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(vitctl JAX per-layer name, array) for every tensor of a big_vision `.npz`, one member at a time."""
    yield from plan(path, cfg, prefix, overrides).iter_tensors()
