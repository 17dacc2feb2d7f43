"""The one table that knows both naming schemes: JAX (NNX) paths <-> PyTorch state_dict keys.

numpy only. Each row pairs a JAX path template with a torch key template and an
invertible layout transform. `{slot}` templates compile to regexes both ways, so one
row serves either direction. Names must match exactly one row (re.fullmatch), and a
conversion must use every source tensor once and produce every expected target tensor
once, with the expected shape, or it raises an error naming the tensors.

JAX stores the blocks stacked (`blocks/q/kernel`, leading L axis); they are unstacked
to `blocks/{i}/q/kernel` before the table applies and restacked after.

Shapes: D width, N heads, K head_dim, F mlp_dim, L depth, P patch, C channels.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, UnmappedParamError


@dataclasses.dataclass(frozen=True)
class Layout:
    """A pair of inverse transforms between the JAX and the torch layout of one tensor."""

    name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    to_jax: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (torch tensor, JAX shape)


SAME = Layout("same", lambda w: w, lambda w, shape: w.reshape(shape))
DENSE = Layout("dense", lambda w: w.T, lambda w, shape: w.T)  # (in, out) <-> (out, in)
CONV = Layout("conv", lambda w: w.transpose(3, 2, 0, 1), lambda w, shape: w.transpose(2, 3, 1, 0))  # HWIO <-> OIHW
HEADS_IN = Layout("heads_in", lambda w: w.reshape(w.shape[0], -1).T, lambda w, shape: w.T.reshape(shape))  # (D,N,K) <-> (N*K,D)
HEADS_OUT = Layout("heads_out", lambda w: w.reshape(-1, w.shape[-1]).T, lambda w, shape: w.T.reshape(shape))  # (N,K,D) <-> (D,N*K)
HEADS_BIAS = Layout("heads_bias", lambda w: w.reshape(-1), lambda w, shape: w.reshape(shape))  # (N,K) <-> (N*K,)
LAYOUTS = (SAME, DENSE, CONV, HEADS_IN, HEADS_OUT, HEADS_BIAS)

SLOTS = {"i": r"\d+", "qkv": "q|k|v", "mlp": "mlp_in|mlp_out", "norm": "norm|mlp_norm|q_norm|k_norm"}


@dataclasses.dataclass(frozen=True)
class Rule:
    jax: str  # "/"-joined NNX path template
    torch: str  # "."-joined state_dict key template
    layout: Layout

    def pattern(self, side: str) -> re.Pattern:
        template = getattr(self, side)
        parts = re.split(r"\{(\w+)\}", template)  # literal, slot, literal, slot, ...
        regex = "".join(re.escape(p) if j % 2 == 0 else f"(?P<{p}>{SLOTS[p]})" for j, p in enumerate(parts))
        return re.compile(regex)


# Rows shared by every attention + MLP scope (the blocks and the MAP head).
_SUBLAYER = (
    ("{norm}/scale", "{norm}.weight", SAME),
    ("{norm}/bias", "{norm}.bias", SAME),
    ("{qkv}/kernel", "{qkv}.weight", HEADS_IN),
    ("{qkv}/bias", "{qkv}.bias", HEADS_BIAS),
    ("attn_out/kernel", "attn_out.weight", HEADS_OUT),
    ("attn_out/bias", "attn_out.bias", SAME),
    ("{mlp}/kernel", "{mlp}.weight", DENSE),
    ("{mlp}/bias", "{mlp}.bias", SAME),
)
PARAM_MAP: tuple[Rule, ...] = (
    #    JAX path                   torch state_dict key       layout
    Rule("patch_embed/proj/kernel", "patch_embed.proj.weight", CONV),
    Rule("patch_embed/proj/bias", "patch_embed.proj.bias", SAME),
    Rule("pos_embed", "pos_embed", SAME),
    Rule("cls_token", "cls_token", SAME),
    *(Rule(f"blocks/{{i}}/{j}", f"blocks.{{i}}.{t}", lay) for j, t, lay in _SUBLAYER),
    Rule("norm/scale", "norm.weight", SAME),
    Rule("norm/bias", "norm.bias", SAME),
    Rule("map_head/probe", "map_head.probe", SAME),
    *(Rule(f"map_head/{j}", f"map_head.{t}", lay) for j, t, lay in _SUBLAYER),
    Rule("head/kernel", "head.weight", DENSE),
    Rule("head/bias", "head.bias", SAME),
)
_PATTERNS = {side: [(r, r.pattern(side)) for r in PARAM_MAP] for side in ("jax", "torch")}


def match(name: str, side: str) -> tuple[Rule, dict[str, str]]:
    """The one rule whose `side` template fully matches `name`, and the slot values."""
    hits = [(r, m.groupdict()) for r, p in _PATTERNS[side] if (m := p.fullmatch(name))]
    if len(hits) != 1:
        what = "no mapping rule matches" if not hits else f"{len(hits)} mapping rules match"
        raise UnmappedParamError(
            f"{what} {side} parameter '{name}'",
            hint="the checkpoint holds a tensor vitctl's models do not have; check the source format and model config",
        )
    return hits[0]


def rename(name: str, src: str) -> tuple[str, Layout]:
    """Maps one per-layer name from side `src` ("jax" or "torch") to the other side."""
    rule, slots = match(name, src)
    dst = "torch" if src == "jax" else "jax"
    return getattr(rule, dst).format(**slots), rule.layout


# Expected tensors.
def jax_param_shapes(cfg: ViTConfig, stacked: bool = True) -> dict[str, tuple[int, ...]]:
    """Every JAX parameter path and its shape, derived from the config alone (no framework).

    With stacked=True, block parameters carry a leading L axis (the model's own layout);
    else they are listed per layer as `blocks/{i}/...`.
    """
    D, N, K, F, P, C = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.patch_size, cfg.channels

    def sublayer(prefix: str, block: bool) -> dict[str, tuple[int, ...]]:
        s = {f"{prefix}/norm/scale": (D,)}
        for qkv in "qkv":
            s[f"{prefix}/{qkv}/kernel"] = (D, N, K)
            if cfg.qkv_bias:
                s[f"{prefix}/{qkv}/bias"] = (N, K)
        s[f"{prefix}/attn_out/kernel"] = (N, K, D)
        s[f"{prefix}/attn_out/bias"] = (D,)
        if block and cfg.qk_norm:
            s[f"{prefix}/q_norm/scale"] = s[f"{prefix}/k_norm/scale"] = (K,)
        if block and cfg.block == "sequential":
            s[f"{prefix}/mlp_norm/scale"] = (D,)
        s[f"{prefix}/mlp_in/kernel"], s[f"{prefix}/mlp_out/kernel"] = (D, F), (F, D)
        s[f"{prefix}/mlp_in/bias"], s[f"{prefix}/mlp_out/bias"] = (F,), (D,)
        if cfg.norm_bias:
            s.update({n.replace("/scale", "/bias"): v for n, v in s.items() if n.endswith("norm/scale")})
        drop = [] if cfg.attn_out_bias else [f"{prefix}/attn_out/bias"]
        drop += [] if cfg.mlp_bias else [f"{prefix}/mlp_in/bias", f"{prefix}/mlp_out/bias"]
        return {n: v for n, v in s.items() if n not in drop}

    shapes = {"patch_embed/proj/kernel": (P, P, C, D), "patch_embed/proj/bias": (D,)}
    if cfg.posemb == "learn":
        shapes["pos_embed"] = (1, cfg.num_patches, D)
    if cfg.pool == "tok":
        shapes["cls_token"] = (1, 1, D)
    block = sublayer("blocks", block=True)
    if stacked:
        shapes.update({n: (cfg.depth, *v) for n, v in block.items()})
    else:
        for i in range(cfg.depth):
            shapes.update({n.replace("blocks/", f"blocks/{i}/", 1): v for n, v in block.items()})
    shapes["norm/scale"] = (D,)
    if cfg.norm_bias:
        shapes["norm/bias"] = (D,)
    if cfg.pool == "map":
        shapes["map_head/probe"] = (1, 1, D)
        shapes.update(sublayer("map_head", block=False))
    if cfg.num_classes:
        shapes["head/kernel"], shapes["head/bias"] = (D, cfg.num_classes), (cfg.num_classes,)
    return shapes


def param_count(cfg: ViTConfig) -> int:
    """len(jax_param_shapes(cfg, stacked=False)) without listing the per-layer names (O(1) in depth)."""
    return sum(cfg.depth if n.startswith("blocks/") else 1 for n in jax_param_shapes(cfg, stacked=True))


def torch_param_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every torch state_dict key (parameters only) and its shape."""
    out = {}
    for name, shape in jax_param_shapes(cfg, stacked=False).items():
        tname, layout = rename(name, "jax")
        out[tname] = layout.to_torch(np.broadcast_to(np.uint8(0), shape)).shape  # zero-stride: no memory
    return out


def param_counts(cfg: ViTConfig) -> dict[str, int]:
    """Exact parameter counts: total, the head (MAP head + classifier), block matmuls."""
    shapes = jax_param_shapes(cfg)
    total = sum(int(np.prod(s)) for s in shapes.values())
    head = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith(("map_head/", "head/")))
    matmul = sum(int(np.prod(s)) for n, s in shapes.items() if n.startswith("blocks/") and n.endswith("/kernel"))
    return {"params_total": total, "params_head": head, "params_encoder": total - head, "params_block_matmul": matmul}


# Stacking: the JAX model's blocks carry a leading L axis.
def unstack(flat: Mapping[str, np.ndarray], depth: int) -> Iterator[tuple[str, np.ndarray]]:
    """`blocks/x/y` with shape (L, ...) -> `blocks/{i}/x/y` for i < L."""
    for name, w in flat.items():
        if name.startswith("blocks/"):
            if w.shape[:1] != (depth,):
                raise CheckpointError(f"stacked block parameter '{name}' has shape {tuple(w.shape)}, expected a leading depth of {depth}")
            for i in range(depth):
                yield name.replace("blocks/", f"blocks/{i}/", 1), w[i]
        else:
            yield name, w


def stack(flat: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """`blocks/{i}/x/y` for i < L -> `blocks/x/y` with a leading L axis."""
    out, layers = {}, {}
    for name, w in flat.items():
        m = re.fullmatch(r"blocks/(\d+)/(.+)", name)
        if m:
            layers.setdefault(m.group(2), {})[int(m.group(1))] = w
        else:
            out[name] = w
    for name, per_layer in layers.items():
        if sorted(per_layer) != list(range(depth)):
            missing = sorted(set(range(depth)) - set(per_layer))
            raise UnmappedParamError(
                f"blocks/*/{name}: missing layers {missing} of {depth}" if missing else f"blocks/*/{name}: layers beyond depth {depth}"
            )
        out[f"blocks/{name}"] = np.stack([per_layer[i] for i in range(depth)])
    return out


# Per-layer tensors a checkpoint may hold: ~200x ViT-22B's (48 layers, ~1,000 tensors), far above any
# real ViT, low enough that listing every name stays under a few hundred MB.
MAX_TENSORS = 250_000


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
            hint="check that config.json describes these weights (width, depth, heads, biases, pool, posemb)",
        )


def check_coverage(got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Every expected tensor present once with its shape, nothing else: or one error listing all."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(got) & set(expected) if tuple(got[n]) != tuple(expected[n]))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for n in wrong[:8]:
        problems.append(f"'{n}' has shape {tuple(got[n])}, expected {tuple(expected[n])}")
    if problems:
        raise UnmappedParamError(
            f"{what} does not match the model config: " + "; ".join(problems),
            hint="check that config.json describes these weights (width, depth, heads, biases, pool, posemb)",
        )


def jax_to_torch(flat: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """JAX parameters (stacked, "/"-joined paths) -> torch state_dict arrays, checked both ways."""
    check_coverage({n: w.shape for n, w in flat.items()}, jax_param_shapes(cfg), "the JAX parameters")
    out = {}
    for name, w in unstack(flat, cfg.depth):
        tname, layout = rename(name, "jax")
        out[tname] = layout.to_torch(w)
    check_coverage({n: w.shape for n, w in out.items()}, torch_param_shapes(cfg), "the converted torch state_dict")
    return out


def torch_to_jax(state: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """torch state_dict arrays -> JAX parameters (stacked), checked both ways."""
    check_coverage({n: w.shape for n, w in state.items()}, torch_param_shapes(cfg), "the torch state_dict")
    expected = jax_param_shapes(cfg, stacked=False)
    out = {}
    for name, w in state.items():
        jname, layout = rename(name, "torch")
        out[jname] = layout.to_jax(w, expected[jname])
    return stack(out, cfg.depth)


def random_weights(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """JAX-named (stacked) float32 weights for `cfg` where every tensor holds distinct, non-trivial
    values: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), the rest
    (position embedding, class token, MAP probe) N(0, 0.5^2). numpy only: no XLA compile, the
    same on every backend. The test suite's parameters (tests/conftest.py, whose golden logits
    pin these draws) and the benchmark's."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in jax_param_shapes(cfg).items():
        per_layer = shape[1:] if name.startswith("blocks/") else shape
        if name.endswith("/kernel"):  # q/k/v kernels are (D, N, K): their fan-in is D alone
            fan_in = per_layer[0] if name.split("/")[-2] in ("q", "k", "v") else int(np.prod(per_layer[:-1]))
            w = rng.normal(0, fan_in**-0.5, shape)
        elif name.endswith("/scale"):
            w = 1 + rng.normal(0, 0.1, shape)
        else:
            w = rng.normal(0, 0.1 if name.endswith("/bias") else 0.5, shape)
        out[name] = w.astype(np.float32)
    return out
