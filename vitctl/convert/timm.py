"""timm as an export target for `vitctl convert jax-to-torch SRC DST --format timm`.

numpy only: timm is needed to use the result, not to make it. Three pieces:
- `timm_spec(cfg)`: the JSON-serialisable call `timm.create_model(model_name, pretrained=False,
  **kwargs)` that builds a timm `VisionTransformer` computing the same function as vitctl's model.
- `timm_tensor_plan(cfg)`: every timm state_dict key, its shape and the vitctl torch keys it is
  made of, in timm's state_dict order.
- `iter_timm_tensors(items, cfg)`: vitctl torch tensors in, timm tensors out. It buffers only the
  parts of a fused tensor (attn.qkv, in_proj, kv) until the last part arrives, then yields it.
  `to_timm_state_dict` is the in-memory form; `timm_hub_config` the timm `config.json` that
  `timm.create_model("local-dir:DST", pretrained=True)` reads beside a single model.safetensors.

How each vitctl config field maps onto timm 1.0 (models/vision_transformer.py):
- block "sequential" -> timm `Block` (norm1, attn.qkv fused, attn.proj, norm2, mlp.fc1/fc2).
  block "parallel" -> `ParallelScalingBlock`: `y = x + ls(attn_out_proj(Attn(N(x))) +
  mlp_out_proj(act(MLP_in(N(x)))))` with one `in_norm`, q_norm/k_norm over head_dim,
  separate out-projection biases: our parallel block exactly. Its fused `in_proj` splits
  as [mlp_hidden, q, k, v] (the MLP first), and its MLP-in bias is `mlp_bias` without a QKV
  bias, else the first F entries of `in_proj.bias`. `block_fn` is a class, not JSON, so the
  block is chosen by the registered model name (vit_base_patch16_224 / vit_base_patch16_xp_224);
  every default those names set is overridden by explicit kwargs.
- layer_scale -> init_values: `Block`'s ls1/ls2 are our ls_attn/ls_mlp; `ParallelScalingBlock`
  has one `ls` on the sum of both branches, so ls_attn and ls_mlp must be equal (checked as
  they stream; reading gives both the one vector).
- norm -> norm_layer "layernormfp32" / "rmsnormfp32": computed in float32 and cast back, as
  vitctl's `Norm`; a norm named by string has timm's eps 1e-6. timm's LayerNorm always has a
  bias (zeros when norm_bias is off); its RmsNorm never has one.
- pool tok/gap/map/none -> global_pool token/avg/map/"", fc_norm -> fc_norm (timm's `fc_norm`
  tensor is our `norm`, applied after pooling; else timm's `norm`, before it, as big_vision).
  pool "none" gives per-token logits on both sides.
- class_posemb -> no_embed_class False (the class token's row comes first in pos_embed); else
  pos_embed covers the patches only -> no_embed_class True. class_token only for pool "tok".
  posemb "sincos2d" -> a learned pos_embed holding the fixed table: the same function.
- norm_pre -> pre_norm: timm's `norm_pre`. timm then builds its patch embedding without a bias,
  so ours is folded into the patch rows of pos_embed: (conv + b) + pos = conv + (pos + b).
- MAP head -> `AttentionPoolLatent` (latent, q, kv = [k; v], proj, norm, mlp). Its q/kv/proj
  and MLP biases always exist: zeros where vitctl has none.
- attn_out_bias / mlp_bias -> timm's one switch `proj_bias` (either on); the other is zeros.
- gelu_approximate -> act_layer "gelu_tanh" / "gelu" (exact erf).
- mlp_dim -> mlp_ratio: timm builds int(D * mlp_ratio) hidden units; the float is chosen so
  that this is exactly mlp_dim (and JSON keeps floats exactly).

Not expressible (ConfigError, hint: --format vitctl):
- norm_eps other than 1e-6: create_model names the norm by string, and the eps would need a
  functools.partial, which JSON cannot hold.
- rmsnorm with norm_bias: timm's RmsNorm has no bias.
- softmax in bfloat16 (softmax_dtype "compute" with dtype "bfloat16"): timm's attention uses
  F.scaled_dot_product_attention (or, globally switched, a float softmax with q pre-scaled).
Numerics that timm leaves to the caller: the timm model computes in the dtype it is run in; in
float32 it matches vitctl's torch model to ~1e-6 (tests/convert/test_timm.py). Weights keep the
dtype of the incoming tensors. Preprocessing goes into `pretrained_cfg_overlay` (input size,
mean/std, interpolation, squash resize); big_vision's non-antialiased resize has no timm field
(timm's eval transform resizes PIL images, which antialiases).

Shapes: D width, N heads, K head_dim, F mlp_dim, L depth, P patch, C channels, T tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError
from vitctl.formats.fastcopy import copy_into, scratch
from vitctl.formats.safetensors import RowStack
from vitctl.params import WHEN as PARAM_WHEN
from vitctl.params import check_coverage, torch_param_shapes
from vitctl.posemb import posemb_sincos_2d

# --- The create_model call ------------------------------------------------------------------------

TIMM_MODEL = {"sequential": "vit_base_patch16_224", "parallel": "vit_base_patch16_xp_224"}  # selects block_fn
TIMM_POOL = {"tok": "token", "gap": "avg", "map": "map", "none": ""}
TIMM_NORM = {"layernorm": "layernormfp32", "rmsnorm": "rmsnormfp32"}
TIMM_ACT = {False: "gelu", True: "gelu_tanh"}  # keyed by cfg.gelu_approximate
TIMM_NORM_EPS = 1e-6  # timm.layers LayerNormFp32 / RmsNormFp32 default

HINT = "export with --format vitctl (vitctl's own torch checkpoint), or change the model config"
# (config -> True if timm cannot express it, why); messages are formatted with the config's fields.
LIMITS: tuple[tuple[Callable[[ViTConfig], bool], str], ...] = (
    (
        lambda c: c.norm_eps != TIMM_NORM_EPS,
        (
            "norm_eps {norm_eps}: timm's create_model names the norm layer by string, which fixes eps at 1e-6 "
            "(another eps needs a functools.partial, which a JSON config cannot hold)"
        ),
    ),
    (lambda c: c.norm == "rmsnorm" and c.norm_bias, "rmsnorm with norm_bias: timm's RmsNorm has no bias"),
    (
        lambda c: c.softmax_dtype == "compute" and c.dtype == "bfloat16",
        "softmax in bfloat16 (softmax_dtype compute, dtype bfloat16): timm's attention has no such option",
    ),
)


def check_expressible(cfg: ViTConfig) -> None:
    """Raises ConfigError naming every reason timm cannot compute `cfg`'s function."""
    fields = dataclasses.asdict(cfg)
    reasons = [msg.format(**fields) for bad, msg in LIMITS if bad(cfg)]
    if reasons:
        raise ConfigError("timm cannot express this model: " + "; ".join(reasons), hint=HINT)


def mlp_ratio(cfg: ViTConfig) -> float:
    """The float r with int(D * r) == F, as timm computes the MLP width (Block, ParallelScalingBlock,
    AttentionPoolLatent). F / D rounded to nearest can land a hair low (D * r = F - 1e-13): step up."""
    r = cfg.mlp_dim / cfg.width
    for _ in range(4):
        if int(cfg.width * r) == cfg.mlp_dim:
            return r
        r = math.nextafter(r, math.inf)
    raise ConfigError(f"no float mlp_ratio gives timm mlp_dim {cfg.mlp_dim} at width {cfg.width}", hint=HINT)


def timm_data_config(cfg: ViTConfig) -> dict[str, Any]:
    """timm pretrained_cfg fields for cfg.preprocess: timm normalises [0, 1] pixels by mean/std,
    so big_vision's value_range (lo, hi) becomes mean -lo / (hi - lo), std 1 / (hi - lo)."""
    p, C, S = cfg.preprocess, cfg.channels, cfg.image_size
    if p.value_range is not None:
        lo, hi = p.value_range
        if hi == lo:
            raise ConfigError(f"preprocess.value_range {p.value_range} is empty", hint="use e.g. [-1, 1]")
        mean, std = [-lo / (hi - lo)] * C, [1.0 / (hi - lo)] * C
    else:
        mean, std = list(p.mean), list(p.std)
    # squash + crop_pct 1: resize both sides to S, no crop (big_vision's `resize(S)`).
    return {"input_size": [C, S, S], "interpolation": p.resize, "mean": mean, "std": std, "crop_pct": 1.0, "crop_mode": "squash"}


def timm_spec(cfg: ViTConfig) -> dict[str, Any]:
    """The timm model for `cfg`: `timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])`.

    JSON-serialisable. `pretrained_cfg_overlay` carries the preprocessing and clears the registered
    name's weight source, so `pretrained=True` cannot silently load Google's ImageNet weights.
    Raises ConfigError if timm cannot express the model.
    """
    check_expressible(cfg)
    kwargs = {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.channels,
        "num_classes": cfg.num_classes,
        "embed_dim": cfg.width,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": mlp_ratio(cfg),
        "qkv_bias": cfg.qkv_bias,
        "qk_norm": cfg.qk_norm,
        "proj_bias": cfg.attn_out_bias or cfg.mlp_bias,
        "class_token": cfg.pool == "tok",
        "no_embed_class": not cfg.class_posemb,
        "global_pool": TIMM_POOL[cfg.pool],
        "fc_norm": cfg.fc_norm,
        "pre_norm": cfg.norm_pre,
        "init_values": cfg.layer_scale or None,
        "norm_layer": TIMM_NORM[cfg.norm],
        "act_layer": TIMM_ACT[cfg.gelu_approximate],
        "pretrained_cfg_overlay": {**timm_data_config(cfg), "num_classes": cfg.num_classes, "hf_hub_id": "", "url": ""},
    }
    return {"model_name": TIMM_MODEL[cfg.block], "kwargs": kwargs}


def timm_hub_config(cfg: ViTConfig, class_names: Any = None) -> dict[str, Any]:
    """timm's hub `config.json` for `cfg`: beside one `model.safetensors` (timm keys) in a directory
    DST, `timm.create_model("local-dir:DST", pretrained=True)` rebuilds and loads the model, and
    from a Hub repo `timm.create_model("hf-hub:org/name", pretrained=True)`. (timm reads one weights
    file there, not HF-style shards.) `class_names` (one str per class) become timm's `label_names`."""
    spec = timm_spec(cfg)
    kwargs = dict(spec["kwargs"])
    overlay = kwargs.pop("pretrained_cfg_overlay")
    # The class count lives at the top (timm reads it there); transformers' TimmWrapper passes
    # num_classes itself beside model_args, so a second one there would be a duplicate argument.
    kwargs.pop("num_classes")
    pretrained_cfg = {
        **{k: v for k, v in overlay.items() if k not in ("hf_hub_id", "url")},
        "architecture": spec["model_name"],
        "custom_load": False,
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    hub = {"architecture": spec["model_name"], "num_classes": cfg.num_classes, "num_features": cfg.width}
    if kwargs["global_pool"]:
        hub["global_pool"] = kwargs["global_pool"]
    if isinstance(class_names, list) and len(class_names) == cfg.num_classes and all(isinstance(c, str) for c in class_names):
        hub["label_names"] = list(class_names)
    return {**hub, "model_args": kwargs, "pretrained_cfg": pretrained_cfg}


def create_model_call(where: str) -> str:
    """The Python line that loads a timm export: `where` is "local-dir:/abs/path" or "hf-hub:org/name[@rev]"."""
    return f"timm.create_model({where!r}, pretrained=True)"


def load_calls(cfg: ViTConfig, dst: str | Path) -> dict[str, Any]:
    """How timm loads the export written to `dst` (made absolute): the `local-dir:` form, which reads
    DST/config.json, and the explicit `create_model(model_name, **kwargs)` call with the weights file
    in `pretrained_cfg_overlay`, which needs no config.json; both tested in tests/convert/test_timm.py."""
    spec, where = timm_spec(cfg), Path(dst).absolute()
    kwargs = dict(spec["kwargs"])
    kwargs["pretrained_cfg_overlay"] = {**kwargs["pretrained_cfg_overlay"], "file": str(where / "model.safetensors")}
    explicit = ", ".join([repr(spec["model_name"]), "pretrained=True", *(f"{k}={v!r}" for k, v in kwargs.items())])
    return {
        "model_name": spec["model_name"], "kwargs": kwargs,
        "create_model": create_model_call(f"local-dir:{where}"), "create_model_explicit": f"timm.create_model({explicit})",
    }  # fmt: skip


# --- The tensor table -----------------------------------------------------------------------------


CAT, FOLD, TIE = "cat", "fold", "tie"  # how a timm tensor is made of its parts


@dataclasses.dataclass(frozen=True)
class TimmRule:
    """One timm tensor made of vitctl torch tensors (one part: a rename). `combine`:
    cat: concatenated along axis 0. fold: the first part (pos_embed) plus the second (the patch
    bias) on its patch rows. tie: every part holds the same values, stored once.

    It exists when every condition named in `when` holds. A part the vitctl model lacks (a bias it
    has turned off, the fixed sin-cos table) is filled: `FILLS`, else zeros. `{i}`: block index.
    """

    timm: str
    parts: tuple[str, ...]
    when: tuple[str, ...] = ()
    combine: str = CAT


# The parameter table's switches (vitctl.params.WHEN), and timm's own.
WHEN: dict[str, Callable[[ViTConfig], bool]] = {
    **PARAM_WHEN,
    "layernorm": lambda c: c.norm == "layernorm",  # timm's LayerNorm always has a bias, RmsNorm never
    "no_qkv_bias": lambda c: not c.qkv_bias,  # ParallelScalingBlock keeps `mlp_bias` apart only then
    "proj_bias": lambda c: c.attn_out_bias or c.mlp_bias,  # timm's one switch for attn-out and MLP biases
    "patch_bias": lambda c: not c.norm_pre,  # timm's pre_norm drops the patch-embedding bias
    "norm_before_pool": lambda c: not c.fc_norm,  # timm's `norm`
    "norm_after_pool": lambda c: c.fc_norm,  # timm's `fc_norm`
}
FILLS: dict[str, Callable[[ViTConfig], np.ndarray]] = {
    "pos_embed": lambda c: posemb_sincos_2d(c.grid, c.grid, c.width),  # posemb sincos2d: the fixed table
}


def _norm(timm: str, ours: str, *when: str) -> tuple[TimmRule, TimmRule]:
    return TimmRule(f"{timm}.weight", (f"{ours}.weight",), when), TimmRule(f"{timm}.bias", (f"{ours}.bias",), (*when, "layernorm"))


def _dense(timm: str, ours: str, *when: str, bias: tuple[str, ...] = ()) -> tuple[TimmRule, TimmRule]:
    return TimmRule(f"{timm}.weight", (f"{ours}.weight",), when), TimmRule(f"{timm}.bias", (f"{ours}.bias",), (*when, *bias))


def _each(prefix: str, names: str | tuple[str, ...], leaf: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{n}.{leaf}" for n in names)


EMBED_RULES: tuple[TimmRule, ...] = (
    TimmRule("cls_token", ("cls_token",), ("tok",)),
    TimmRule("pos_embed", ("pos_embed",), ("patch_bias",)),
    TimmRule("pos_embed", ("pos_embed", "patch_embed.proj.bias"), ("norm_pre",), FOLD),
    TimmRule("patch_embed.proj.weight", ("patch_embed.proj.weight",)),  # (D, C, P, P): timm's conv, our reshape
    TimmRule("patch_embed.proj.bias", ("patch_embed.proj.bias",), ("patch_bias",)),
    *_norm("norm_pre", "norm_pre", "norm_pre"),
)
_B = "blocks.{i}."
BLOCK_RULES: dict[str, tuple[TimmRule, ...]] = {
    # timm Block: x + attn.proj(attn(norm1(x))); then x + mlp.fc2(act(mlp.fc1(norm2(x)))).
    # attn.qkv (3NK, D) is [q; k; v]: timm reshapes its output to (B, T, 3, N, K).
    "sequential": (
        *_norm(_B + "norm1", _B + "norm"),
        TimmRule(_B + "attn.qkv.weight", _each(_B, "qkv", "weight")),
        TimmRule(_B + "attn.qkv.bias", _each(_B, "qkv", "bias"), ("qkv_bias",)),
        *_norm(_B + "attn.q_norm", _B + "q_norm", "qk_norm"),
        *_norm(_B + "attn.k_norm", _B + "k_norm", "qk_norm"),
        *_dense(_B + "attn.proj", _B + "attn_out", bias=("proj_bias",)),
        TimmRule(_B + "ls1.gamma", (_B + "ls_attn.weight",), ("layer_scale",)),
        *_norm(_B + "norm2", _B + "mlp_norm"),
        *_dense(_B + "mlp.fc1", _B + "mlp_in", bias=("proj_bias",)),
        *_dense(_B + "mlp.fc2", _B + "mlp_out", bias=("proj_bias",)),
        TimmRule(_B + "ls2.gamma", (_B + "ls_mlp.weight",), ("layer_scale",)),
    ),
    # timm ParallelScalingBlock: in_proj (F + 3NK, D) splits as [mlp_in; q; k; v].
    "parallel": (
        TimmRule(_B + "mlp_bias", (_B + "mlp_in.bias",), ("no_qkv_bias",)),
        *_norm(_B + "in_norm", _B + "norm"),
        TimmRule(_B + "in_proj.weight", _each(_B, ("mlp_in", "q", "k", "v"), "weight")),
        TimmRule(_B + "in_proj.bias", _each(_B, ("mlp_in", "q", "k", "v"), "bias"), ("qkv_bias",)),
        *_norm(_B + "q_norm", _B + "q_norm", "qk_norm"),
        *_norm(_B + "k_norm", _B + "k_norm", "qk_norm"),
        *_dense(_B + "attn_out_proj", _B + "attn_out", bias=("proj_bias",)),
        *_dense(_B + "mlp_out_proj", _B + "mlp_out", bias=("proj_bias",)),
        TimmRule(_B + "ls.gamma", (_B + "ls_attn.weight", _B + "ls_mlp.weight"), ("layer_scale",), TIE),
    ),
}
_M = "map_head."
HEAD_RULES: tuple[TimmRule, ...] = (
    *_norm("norm", "norm", "norm_before_pool"),
    # AttentionPoolLatent: q(latent) attends over kv(x) = [k; v]; every bias always present.
    TimmRule("attn_pool.latent", (_M + "probe",), ("map",)),
    *_dense("attn_pool.q", _M + "q", "map"),
    TimmRule("attn_pool.kv.weight", _each(_M, "kv", "weight"), ("map",)),
    TimmRule("attn_pool.kv.bias", _each(_M, "kv", "bias"), ("map",)),
    *_dense("attn_pool.proj", _M + "attn_out", "map"),
    *_norm("attn_pool.norm", _M + "norm", "map"),
    *_dense("attn_pool.mlp.fc1", _M + "mlp_in", "map"),
    *_dense("attn_pool.mlp.fc2", _M + "mlp_out", "map"),
    *_norm("fc_norm", "norm", "norm_after_pool"),
    *_dense("head", "head", "head"),
)


class Part(NamedTuple):
    name: str  # vitctl torch state_dict key
    shape: tuple[int, ...]
    present: bool  # False: filled (FILLS or zeros), not read


class TimmTensor(NamedTuple):
    name: str  # timm state_dict key
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # vitctl torch keys to read for it (filled parts left out)
    parts: tuple[Part, ...]  # all parts, in concatenation order
    combine: str = CAT  # TimmRule.combine


def timm_tensor_plan(cfg: ViTConfig) -> list[TimmTensor]:
    """Every timm tensor for `cfg`, in timm's state_dict order, from the config alone.

    Each entry unpacks as (timm_name, shape, sources, parts). Reading the sources of one entry
    after another keeps `iter_timm_tensors` at one fused group in memory.
    """
    check_expressible(cfg)
    have = torch_param_shapes(cfg)
    # Shapes of the parts this config lacks: the same model with every bias and a learned posemb.
    full = torch_param_shapes(dataclasses.replace(cfg, qkv_bias=True, attn_out_bias=True, mlp_bias=True, norm_bias=True, posemb="learn"))
    layers = [(r, {}) for r in EMBED_RULES]
    layers += [(r, {"i": i}) for i in range(cfg.depth) for r in BLOCK_RULES[cfg.block]]
    layers += [(r, {}) for r in HEAD_RULES]
    plan = []
    for rule, slots in layers:
        if not all(WHEN[w](cfg) for w in rule.when):
            continue
        parts = tuple(Part(n, tuple(full[n]), n in have) for n in (p.format(**slots) for p in rule.parts))
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if rule.combine == CAT else parts[0].shape
        plan.append(TimmTensor(rule.timm.format(**slots), shape, tuple(p.name for p in parts if p.present), parts, rule.combine))
    used = [s for t in plan for s in t.sources]
    assert sorted(used) == sorted(have), f"timm table does not use every vitctl tensor once: {sorted(set(have) ^ set(used))}"
    return plan


def timm_param_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every timm state_dict key for `cfg` and its shape."""
    return {t.name: t.shape for t in timm_tensor_plan(cfg)}


# --- Streaming conversion -------------------------------------------------------------------------


def _fill(p: Part, cfg: ViTConfig, dtype: np.dtype) -> np.ndarray:
    fill = FILLS.get(p.name)
    return (fill(cfg) if fill else np.zeros(p.shape)).astype(dtype)


def _assemble(t: TimmTensor, buffer: dict[str, np.ndarray], cfg: ViTConfig, dtype: np.dtype, stacks: bool) -> np.ndarray | RowStack:
    """Pops t's parts from `buffer` (filling absent ones) and combines them: concatenated along
    axis 0 (stacks: handed out as a RowStack, not copied together), folded or tied."""
    dtype = next((buffer[p.name].dtype for p in t.parts if p.present), dtype)
    arrays = [buffer.pop(p.name) if p.present else _fill(p, cfg, dtype) for p in t.parts]
    if t.combine == FOLD:  # pos_embed + the patch bias on the patch rows (the class token's row, if any, comes first)
        out = np.array(arrays[0], np.float32)  # summed in float32, rounded once to the tensor's dtype
        out[0, out.shape[1] - cfg.num_patches :] += arrays[1].astype(np.float32)
        out = out.astype(dtype)
    elif t.combine == TIE:
        if any(not np.array_equal(a, arrays[0]) for a in arrays[1:]):
            raise CheckpointError(
                f"{' and '.join(p.name for p in t.parts)} differ, and timm's {t.name} holds one vector for both",
                hint=f"timm's ParallelScalingBlock scales the sum of its branches by one layer scale; {HINT}",
            )
        out = arrays[0]
    elif len(arrays) == 1:
        out = arrays[0]
    elif stacks:
        out = RowStack(tuple(arrays))
    else:  # np.concatenate of transposed views copies element by element; copy_into transposes each part with BLAS
        out, row = scratch(t.shape, dtype), 0
        for a in arrays:
            copy_into(out[row : row + a.shape[0]], a)
            row += a.shape[0]
    assert out.shape == t.shape, (t.name, out.shape, t.shape)
    return out


def iter_timm_tensors(
    items: Iterable[tuple[str, np.ndarray]], cfg: ViTConfig, stacks: bool = False
) -> Iterator[tuple[str, np.ndarray | RowStack]]:
    """vitctl torch tensors (name, array) in any order -> timm tensors (name, array).

    With `stacks`, a fused tensor comes as an io.RowStack of its parts, for a writer that writes
    each part at its place (io.SafetensorsWriter): no copy of the fused tensor is made.

    A timm tensor is yielded as soon as its last part arrives; only parts of unfinished fused
    tensors are held. Tensors made only of filled parts (zero biases, the sin-cos table) come
    right after the first input, in its dtype. Raises UnmappedParamError for a name the model
    lacks, a repeated name or, at the end, missing names; CheckpointError for a wrong shape.
    """
    plan = timm_tensor_plan(cfg)
    expected = torch_param_shapes(cfg)
    owner = {s: t for t in plan for s in t.sources}
    waiting = {t.name: len(t.sources) for t in plan}
    buffer: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for name, w in items:
        if name not in expected:
            raise UnmappedParamError(
                f"'{name}' is not a parameter of this vitctl model",
                hint="check that config.json describes these weights (width, depth, heads, biases, pool, posemb)",
            )
        if name in seen:
            raise UnmappedParamError(f"'{name}' appears twice in the input", hint="each tensor must be given once")
        if tuple(w.shape) != tuple(expected[name]):
            raise CheckpointError(f"'{name}' has shape {tuple(w.shape)}, expected {tuple(expected[name])}")
        if not seen:
            yield from ((t.name, _assemble(t, buffer, cfg, w.dtype, stacks)) for t in plan if not t.sources)
        seen.add(name)
        t = owner[name]
        buffer[name] = w
        waiting[t.name] -= 1
        if not waiting[t.name]:
            yield t.name, _assemble(t, buffer, cfg, w.dtype, stacks)
    missing = sorted(set(expected) - seen)
    if missing:
        raise UnmappedParamError(
            f"missing {len(missing)} vitctl tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
            hint="the source checkpoint is incomplete or config.json does not describe it",
        )


def to_timm_state_dict(torch_state: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """vitctl torch state_dict (numpy arrays) -> timm state_dict (numpy arrays), in timm's order."""
    out = dict(iter_timm_tensors(torch_state.items(), cfg))
    return {t.name: out[t.name] for t in timm_tensor_plan(cfg)}


def from_timm_state_dict(timm_state: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, np.ndarray]:
    """The inverse of `to_timm_state_dict`: fused timm tensors split back into vitctl torch tensors."""
    plan = timm_tensor_plan(cfg)
    check_coverage({n: tuple(w.shape) for n, w in timm_state.items()}, {t.name: t.shape for t in plan}, "the timm state_dict")
    return {name: piece for t in plan for name, piece in split_timm_tensor(t, timm_state[t.name], cfg)}


def split_timm_tensor(t: TimmTensor, w: np.ndarray, cfg: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(vitctl torch name, view of `w`) for each part of timm tensor `t` that vitctl's model has.

    A part vitctl's model fixes (a zero bias, the sin-cos table) must hold what the model computes,
    or CheckpointError names the tensor. A folded patch bias stays in pos_embed and reads as zeros
    (the same function); a tied layer scale is given to both branches."""
    start = 0
    for p in t.parts:
        if t.combine == CAT:
            piece, start = w[start : start + p.shape[0]], start + p.shape[0]
        else:
            piece = w if p is t.parts[0] or t.combine == TIE else np.zeros(p.shape, w.dtype)
        if p.present:
            yield p.name, piece
        elif not np.array_equal(piece, _fill(p, cfg, piece.dtype)):
            raise CheckpointError(_fixed_part_message(t, p), hint=FIXED_HINT)


FIXED_HINT = "vitctl's model (config.json's `model`) cannot hold these weights; convert them with the model config that has this tensor"


def _fixed_part_message(t: TimmTensor, p: Part) -> str:
    what = "the fixed 2-D sin-cos table (posemb sincos2d)" if p.name in FILLS else "zeros (the model config has no such parameter)"
    where = t.name if len(t.parts) == 1 else f"{t.name} (its part for {p.name})"
    return f"timm tensor {where} must hold {what}, but holds other values: vitctl's model would silently compute another function"
