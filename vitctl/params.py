"""The one table of the model's parameters: both names, layout, shape and when each exists.

numpy only. Each row of PARAMS is one parameter: its JAX path (NNX, "/"-joined; block
parameters stacked as `blocks/q/kernel` with a leading L axis), its torch state_dict key
(per layer: `blocks.{i}.q.weight`), the invertible layout between the two tensors, its shape
as letters of the config (below), and the config switches under which it exists. Everything
else is derived from the table: the JAX and torch shapes, the counts, renaming, stacking,
coverage checks and random weights. Rows are in the model's parameter order, which fixes the
order of every listing (and so the draws of `random_weights`).

Names are `{slot}` templates (`blocks.{i}.q.weight`). `NameTable` compiles templates to
regexes both ways, so one row renames in either direction; the big_vision key table uses it
too. A name must match exactly one row (re.fullmatch) or renaming raises UnmappedParamError.

Shapes: D width, N heads, K head_dim, F mlp_dim, L depth, P patch, C channels, T tokens
(patches), E position-embedding rows (T, plus the class token's with class_posemb), O classes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, UnmappedParamError

Shape = tuple[int, ...]


# --- Layouts: how a torch tensor relates to the JAX one ---------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """A pair of inverse transforms between the JAX and the torch layout of one tensor."""

    name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_jax: Callable[[np.ndarray, Shape], np.ndarray]  # (torch tensor, JAX shape)


SAME = Layout("same", lambda w: w, lambda w, shape: w.reshape(shape))
DENSE = Layout("dense", lambda w: w.T, lambda w, shape: w.T)  # (in, out) <-> (out, in)
CONV = Layout("conv", lambda w: w.transpose(3, 2, 0, 1), lambda w, shape: w.transpose(2, 3, 1, 0))  # HWIO <-> OIHW
HEADS_IN = Layout("heads_in", lambda w: w.reshape(w.shape[0], -1).T, lambda w, shape: w.T.reshape(shape))  # (D,N,K) <-> (N*K,D)
HEADS_OUT = Layout("heads_out", lambda w: w.reshape(-1, w.shape[-1]).T, lambda w, shape: w.T.reshape(shape))  # (N,K,D) <-> (D,N*K)
HEADS_BIAS = Layout("heads_bias", lambda w: w.reshape(-1), lambda w, shape: w.reshape(shape))  # (N,K) <-> (N*K,)
LAYOUTS = (SAME, DENSE, CONV, HEADS_IN, HEADS_OUT, HEADS_BIAS)


# --- Stacked block names ----------------------------------------------------------------------

BLOCKS = "blocks/"  # the JAX model scans its blocks: `blocks/x` holds every layer of x


def is_stacked(name: str) -> bool:
    """`blocks/q/kernel` (leading L axis) is stacked; `blocks/3/q/kernel` is one layer."""
    parts = name.split("/")
    return parts[0] == "blocks" and len(parts) > 1 and not parts[1].isdigit()


def layer_name(stacked: str, i: int | str) -> str:
    """`blocks/q/kernel`, 3 -> `blocks/3/q/kernel` (i="{i}" gives the per-layer template)."""
    return stacked.replace(BLOCKS, f"{BLOCKS}{i}/", 1)


def split_layer(name: str) -> tuple[str, int | None]:
    """`blocks/3/q/kernel` -> ("blocks/q/kernel", 3); anything else -> (name, None)."""
    m = re.fullmatch(r"blocks/(\d+)/(.+)", name)
    return (f"{BLOCKS}{m.group(2)}", int(m.group(1))) if m else (name, None)


# --- The table --------------------------------------------------------------------------------

# Config switches a row can require (all of them must hold).
WHEN: dict[str, Callable[[ViTConfig], bool]] = {
    "learn": lambda c: c.posemb == "learn",
    "tok": lambda c: c.pool == "tok",
    "map": lambda c: c.pool == "map",
    "head": lambda c: bool(c.num_classes),
    "sequential": lambda c: c.block == "sequential",
    "qk_norm": lambda c: c.qk_norm,
    "qkv_bias": lambda c: c.qkv_bias,
    "attn_out_bias": lambda c: c.attn_out_bias,
    "mlp_bias": lambda c: c.mlp_bias,
    "norm_bias": lambda c: c.norm_bias,
    "norm_pre": lambda c: c.norm_pre,
    "layer_scale": lambda c: c.layer_scale > 0,
}


def dims(cfg: ViTConfig) -> dict[str, int]:
    """The shape letters' sizes (per layer: L is the stacking axis, not a letter)."""
    return {"D": cfg.width, "N": cfg.num_heads, "K": cfg.head_dim, "F": cfg.mlp_dim, "P": cfg.patch_size,
            "C": cfg.channels, "T": cfg.num_patches, "E": cfg.posemb_len, "O": cfg.num_classes, "1": 1}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Param:
    jax: str  # "/"-joined NNX path; `blocks/...` is stacked (leading L axis)
    torch: str  # "."-joined state_dict key template; `blocks.{i}....` per layer
    layout: Layout
    shape: str  # one letter per axis of the JAX tensor (per layer), e.g. "DNK"
    when: tuple[str, ...] = ()  # WHEN switches that must all hold

    @property
    def stacked(self) -> bool:
        return is_stacked(self.jax)

    @property
    def jax_layer(self) -> str:
        """The per-layer JAX template: `blocks/{i}/q/kernel`."""
        return layer_name(self.jax, "{i}") if self.stacked else self.jax

    def exists(self, cfg: ViTConfig) -> bool:
        return all(WHEN[w](cfg) for w in self.when)


def _scope(j: str, t: str, block: bool, when: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """The attention + MLP rows shared by each block and the MAP head (which has no q/k norm
    and no MLP norm). Norm biases come last, in the order of their scales."""
    norms = (("norm", "D", ()),)
    if block:
        norms += (("q_norm", "K", ("qk_norm",)), ("k_norm", "K", ("qk_norm",)), ("mlp_norm", "D", ("sequential",)))
    return (
        Param(f"{j}norm/scale", f"{t}norm.weight", SAME, "D", when),
        *(p for x in "qkv" for p in (
            Param(f"{j}{x}/kernel", f"{t}{x}.weight", HEADS_IN, "DNK", when),
            Param(f"{j}{x}/bias", f"{t}{x}.bias", HEADS_BIAS, "NK", (*when, "qkv_bias")),
        )),
        Param(f"{j}attn_out/kernel", f"{t}attn_out.weight", HEADS_OUT, "NKD", when),
        Param(f"{j}attn_out/bias", f"{t}attn_out.bias", SAME, "D", (*when, "attn_out_bias")),
        *(Param(f"{j}{n}/scale", f"{t}{n}.weight", SAME, s, (*when, *w)) for n, s, w in norms[1:]),
        Param(f"{j}mlp_in/kernel", f"{t}mlp_in.weight", DENSE, "DF", when),
        Param(f"{j}mlp_out/kernel", f"{t}mlp_out.weight", DENSE, "FD", when),
        Param(f"{j}mlp_in/bias", f"{t}mlp_in.bias", SAME, "F", (*when, "mlp_bias")),
        Param(f"{j}mlp_out/bias", f"{t}mlp_out.bias", SAME, "D", (*when, "mlp_bias")),
        *(Param(f"{j}{n}/bias", f"{t}{n}.bias", SAME, s, (*when, *w, "norm_bias")) for n, s, w in norms),
    )  # fmt: skip


PARAMS: tuple[Param, ...] = (
    #     JAX path                  torch state_dict key       layout  shape  exists when
    Param("patch_embed/proj/kernel", "patch_embed.proj.weight", CONV, "PPCD"),  # HWIO <-> OIHW
    Param("patch_embed/proj/bias", "patch_embed.proj.bias", SAME, "D"),
    Param("pos_embed", "pos_embed", SAME, "1ED", ("learn",)),  # E: T, or T + 1 with class_posemb
    Param("cls_token", "cls_token", SAME, "11D", ("tok",)),
    Param("norm_pre/scale", "norm_pre.weight", SAME, "D", ("norm_pre",)),
    Param("norm_pre/bias", "norm_pre.bias", SAME, "D", ("norm_pre", "norm_bias")),
    *_scope("blocks/", "blocks.{i}.", block=True),
    Param("blocks/ls_attn/scale", "blocks.{i}.ls_attn.weight", SAME, "D", ("layer_scale",)),
    Param("blocks/ls_mlp/scale", "blocks.{i}.ls_mlp.weight", SAME, "D", ("layer_scale",)),
    Param("norm/scale", "norm.weight", SAME, "D"),
    Param("norm/bias", "norm.bias", SAME, "D", ("norm_bias",)),
    Param("map_head/probe", "map_head.probe", SAME, "11D", ("map",)),
    *_scope("map_head/", "map_head.", block=False, when=("map",)),
    Param("head/kernel", "head.weight", DENSE, "DO", ("head",)),
    Param("head/bias", "head.bias", SAME, "O", ("head",)),
)


# --- {slot} templates, compiled both ways -----------------------------------------------------

SLOTS = {"i": r"\d+"}  # the block index; a table adds its own slots


def compile_template(template: str, slots: Mapping[str, str] = SLOTS) -> re.Pattern:
    """`blocks.{i}.q.weight` -> a regex whose named groups are the slots (each slot's regex from `slots`)."""
    parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
    return re.compile("".join(re.escape(p) if j % 2 == 0 else f"(?P<{p}>{slots[p]})" for j, p in enumerate(parts)))


class NameTable:
    """Rows that pair one `{slot}` template per side; a name on one side renames to any other.

    Args:
      rows: the table's rows (any objects).
      sides: side name -> the row attribute holding that side's template.
      slots: slot name -> regex of its values, on top of SLOTS; a value is the same on every side.
    """

    def __init__(self, rows: Iterable, sides: Mapping[str, str], slots: Mapping[str, str] | None = None):
        self.rows, self.sides, slots = tuple(rows), dict(sides), {**SLOTS, **(slots or {})}
        self._patterns = {s: [(r, compile_template(getattr(r, a), slots)) for r in self.rows] for s, a in self.sides.items()}

    def matches(self, name: str, side: str) -> list[tuple[object, dict[str, str]]]:
        """Every (row, slot values) whose `side` template fully matches `name`."""
        return [(r, m.groupdict()) for r, p in self._patterns[side] if (m := p.fullmatch(name))]

    def fill(self, row: object, side: str, slots: Mapping[str, str]) -> str:
        """The row's `side` name for the given slot values."""
        return getattr(row, self.sides[side]).format(**slots)


NAMES = NameTable(PARAMS, {"jax": "jax_layer", "torch": "torch"})


def match(name: str, side: str) -> tuple[Param, dict[str, str]]:
    """The one row whose `side` ("jax" per layer, or "torch") template fully matches `name`, and the slot values."""
    hits = NAMES.matches(name, side)
    if len(hits) != 1:
        what = "no mapping rule matches" if not hits else f"{len(hits)} mapping rules match"
        raise UnmappedParamError(
            f"{what} {side} parameter '{name}'",
            hint="the checkpoint holds a tensor vitctl's models do not have; check the source format and model config",
        )
    return hits[0]


def rename(name: str, src: str) -> tuple[str, Layout]:
    """Maps one per-layer name from side `src` ("jax" or "torch") to the other side."""
    row, slots = match(name, src)
    return NAMES.fill(row, "torch" if src == "jax" else "jax", slots), row.layout


# --- Expected tensors -------------------------------------------------------------------------


def _rows(cfg: ViTConfig) -> list[tuple[Param, Shape]]:
    """The config's parameters and their per-layer JAX shapes, in table order."""
    d = dims(cfg)
    return [(p, tuple(d[a] for a in p.shape)) for p in PARAMS if p.exists(cfg)]


def _per_layer(cfg: ViTConfig) -> Iterator[tuple[Param, int | None, Shape]]:
    """(row, layer or None, per-layer JAX shape) in listing order: the blocks layer by layer."""
    rows = _rows(cfg)
    blocks = [(p, s) for p, s in rows if p.stacked]
    for p, s in rows:
        if not p.stacked:
            yield p, None, s
        elif p is blocks[0][0]:
            yield from ((q, i, t) for i in range(cfg.depth) for q, t in blocks)


def jax_param_shapes(cfg: ViTConfig, stacked: bool = True) -> dict[str, Shape]:
    """Every JAX parameter path and its shape, derived from the config alone (no framework).

    With stacked=True, block parameters carry a leading L axis (the model's own layout);
    else they are listed per layer as `blocks/{i}/...`.
    """
    if stacked:
        return {p.jax: (cfg.depth, *s) if p.stacked else s for p, s in _rows(cfg)}
    return {p.jax if i is None else layer_name(p.jax, i): s for p, i, s in _per_layer(cfg)}


def torch_param_shapes(cfg: ViTConfig) -> dict[str, Shape]:
    """Every torch state_dict key (parameters only) and its shape."""
    shape = {p: p.layout.to_torch(np.broadcast_to(np.uint8(0), s)).shape for p, s in _rows(cfg)}  # zero-stride: no memory
    return {p.torch.format(i=i): shape[p] for p, i, _ in _per_layer(cfg)}


def param_count(cfg: ViTConfig) -> int:
    """len(jax_param_shapes(cfg, stacked=False)) without listing the per-layer names (O(1) in depth)."""
    return sum(cfg.depth if p.stacked else 1 for p, _ in _rows(cfg))


def param_counts(cfg: ViTConfig) -> dict[str, int]:
    """Exact parameter counts: total, the head (MAP head + classifier), block matmuls."""
    shapes = jax_param_shapes(cfg)
    total = sum(int(np.prod(s)) for s in shapes.values())
    head = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith(("map_head/", "head/")))
    matmul = sum(int(np.prod(s)) for n, s in shapes.items() if is_stacked(n) and n.endswith("/kernel"))
    return {"params_total": total, "params_head": head, "params_encoder": total - head, "params_block_matmul": matmul}


# --- Stacking: the JAX model's blocks carry a leading L axis ----------------------------------


def unstack(flat: Mapping[str, np.ndarray], depth: int) -> Iterator[tuple[str, np.ndarray]]:
    """`blocks/x/y` with shape (L, ...) -> `blocks/{i}/x/y` for i < L."""
    for name, w in flat.items():
        if name.startswith(BLOCKS):
            if w.shape[:1] != (depth,):
                raise CheckpointError(f"stacked block parameter '{name}' has shape {tuple(w.shape)}, expected a leading depth of {depth}")
            for i in range(depth):
                yield layer_name(name, i), w[i]
        else:
            yield name, w


def stack(flat: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """`blocks/{i}/x/y` for i < L -> `blocks/x/y` with a leading L axis."""
    out, layers = {}, {}
    for name, w in flat.items():
        stacked, i = split_layer(name)
        if i is None:
            out[name] = w
        else:
            layers.setdefault(stacked, {})[i] = w
    for name, per_layer in layers.items():
        if sorted(per_layer) != list(range(depth)):
            missing = sorted(set(range(depth)) - set(per_layer))
            what = f"missing layers {missing} of {depth}" if missing else f"layers beyond depth {depth}"
            raise UnmappedParamError(f"blocks/*/{name[len(BLOCKS) :]}: {what}")
        out[name] = np.stack([per_layer[i] for i in range(depth)])
    return out


# --- Coverage: the tensors a checkpoint holds against the config's ---------------------------

# Per-layer tensors a checkpoint may hold: ~200x ViT-22B's (48 layers, ~1,000 tensors), far above any
# real ViT, low enough that listing every name stays under a few hundred MB.
MAX_TENSORS = 250_000
CONFIG_HINT = "check that config.json describes these weights (width, depth, heads, biases, pool, posemb)"


def check_count(got: int, cfg: ViTConfig, what: str) -> None:
    """The tensor count the headers give against the config's, before any per-layer name is listed.

    Coverage checks list every expected name, and the config (a small config.json a stranger
    wrote) sets how many: depth 10^6 would list tens of millions of names before a shape is
    compared. Counts are compared first, and a config that expects far more tensors than the
    weights hold (or far fewer) is refused here, so the names listed stay within a small
    multiple of what the headers hold; a near miss (a missing layer, a wrong head) goes on to
    the coverage check, which names each tensor. Nor is any config listed past MAX_TENSORS."""
    want = param_count(cfg)
    if max(want, got) > MAX_TENSORS:
        raise UnmappedParamError(
            f"{what}: the config (depth {cfg.depth:,}) needs {want:,} tensors and the weights hold {got:,}; vitctl reads at most {MAX_TENSORS:,}",
            hint="no ViT has that many tensors: the config or the checkpoint is damaged or hostile",
        )
    if want > 2 * got + 64 or got > 2 * want + 64:
        raise UnmappedParamError(
            f"{what} does not match the model config: the config (depth {cfg.depth:,}) needs {want:,} tensors, the weights hold {got:,}",
            hint=CONFIG_HINT,
        )


def _listed(what: str, names: list[str]) -> str:
    return f"{what} {len(names)}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"


def check_coverage(got: Mapping[str, Shape], expected: Mapping[str, Shape], what: str) -> None:
    """Every expected tensor present once with its shape, nothing else: or one error listing all."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(got) & set(expected) if tuple(got[n]) != tuple(expected[n]))
    problems = [_listed("missing", missing)] if missing else []
    problems += [_listed("unexpected", unexpected)] if unexpected else []
    problems += [f"'{n}' has shape {tuple(got[n])}, expected {tuple(expected[n])}" for n in wrong[:8]]
    if problems:
        raise UnmappedParamError(f"{what} does not match the model config: " + "; ".join(problems), hint=CONFIG_HINT)


# --- Random weights ---------------------------------------------------------------------------


def random_weights(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """JAX-named (stacked) float32 weights for `cfg` where every tensor holds distinct, non-trivial
    values: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), the rest
    (position embedding, class token, MAP probe) N(0, 0.5^2). numpy only: no XLA compile, the
    same on every backend. The test suite's parameters (tests/conftest.py, whose golden logits
    pin these draws, in table order) and the benchmark's."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in jax_param_shapes(cfg).items():
        per_layer = shape[1:] if is_stacked(name) else shape
        if name.endswith("/kernel"):  # q/k/v kernels are (D, N, K): their fan-in is D alone
            fan_in = per_layer[0] if name.split("/")[-2] in ("q", "k", "v") else int(np.prod(per_layer[:-1]))
            w = rng.normal(0, fan_in**-0.5, shape)
        elif name.endswith("/scale"):
            w = 1 + rng.normal(0, 0.1, shape)
        else:
            w = rng.normal(0, 0.1 if name.endswith("/bias") else 0.5, shape)
        out[name] = w.astype(np.float32)
    return out
