"""timm checkpoints as a source: a timm Hub directory (config.json + model.safetensors) -> ViTConfig.

numpy only: reading works without timm. timm's Hub config.json names the model by its registered
`architecture` (with optional `model_args`, `num_classes`, `global_pool`, `pretrained_cfg`,
`label_names`); the model is rebuilt from that name's defaults, then `model_args`, then the
tensors' shapes, which give the sizes (width, depth, mlp_dim, classes, patch, image size,
channels). The heads come from the name's table or `model_args`.

Covered: the registered `vit_{tiny,small,base,large,huge,giant,gigantic}_patch{P}_{res}` names
(timm `VisionTransformer` with `Block`) and `vit_{size}_patch{P}_xp_{res}` (`ParallelScalingBlock`,
QK-norm, RmsNorm, pre_norm, no class position row), and vitctl's own timm exports (which name
one of those and set every argument explicitly). The tensors are then split back by the export
table (vitctl.convert.timm), which checks names, shapes and the parts vitctl's model fixes.

Refused by name, never dropped (ConfigError): another architecture; register tokens; a class
token with a pool other than token; pools other than token/avg/map/''; activations other than
gelu/gelu_tanh; norms other than LayerNorm/RmsNorm; pos_embed kinds other than learned; dynamic
image size or padding; scaled attention/MLP norms; an embedding norm; no final norm; any
model_args key this table does not know. A config whose sizes contradict the tensors is refused
with both numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from vitctl.config import BOUNDS, CHOICES, ViTConfig
from vitctl.errors import ConfigError

HINT = "vitctl reads timm's ViT and its parallel (_xp_) variant; convert other models with timm itself"
# name -> (embed_dim, depth, num_heads, mlp_ratio). Reference: timm models/vision_transformer.py
# (vit_tiny_patch16_224 ... vit_gigantic_patch14_224; giant and gigantic from arXiv:2106.04560).
SIZES: dict[str, tuple[int, int, int, float]] = {
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
    "gigantic": (1664, 48, 16, 64 / 13),
}
ARCHITECTURE = re.compile(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d{1,4})(?P<xp>_xp)?_(?P<res>\d{1,5})")
# timm VisionTransformer's defaults for the arguments that change the function. num_classes: a
# registered name's default comes from its pretrained weights' config, so, unless config.json
# states it, the head's rows give it.
DEFAULTS: dict[str, Any] = {
    "in_chans": 3, "num_classes": None, "global_pool": "token", "qkv_bias": True, "qk_norm": False,
    "scale_attn_norm": False, "scale_mlp_norm": False, "proj_bias": True, "init_values": None, "class_token": True,
    "pos_embed": "learn", "no_embed_class": False, "reg_tokens": 0, "pre_norm": False, "final_norm": True,
    "fc_norm": None, "pool_include_prefix": False, "dynamic_img_size": False, "dynamic_img_pad": False,
    "embed_norm_layer": None, "norm_layer": None, "act_layer": None,
}  # fmt: skip
# The _xp_ names' overrides (vit_base_patch16_xp_224: ParallelScalingBlock, RmsNorm, QK-norm).
XP = {"pre_norm": True, "no_embed_class": True, "norm_layer": "rmsnorm", "qkv_bias": False, "qk_norm": True}
# Arguments that only change training (dropout, init) or timm's bookkeeping: read and left alone.
TRAINING_ONLY = {
    "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate",
    "weight_init", "fix_init", "pretrained_cfg_overlay", "pretrained_strict",
}  # fmt: skip
SIZE_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "mlp_ratio", "num_heads")
POOLS = {"token": "tok", "avg": "gap", "map": "map", "": "none"}
NORMS = {None: "layernorm", "layernorm": "layernorm", "layernormfp32": "layernorm", "rmsnorm": "rmsnorm", "rmsnormfp32": "rmsnorm"}
ACTS = {None: False, "gelu": False, "gelu_tanh": True}  # -> gelu_approximate
NORM_EPS = 1e-6  # timm's LayerNorm and RmsNorm default, for a norm named by string or by default


def architecture_defaults(name: Any) -> tuple[str, dict[str, Any]]:
    """("sequential" | "parallel", timm kwargs) for a registered architecture name; refuses others."""
    if not isinstance(name, str):
        raise ConfigError(f"timm config.json: `architecture` must be a model name, got {name!r:.80}", hint=HINT)
    base = name.split(".", 1)[0]  # "vit_base_patch16_224.augreg_in21k": the tag names the weights, not the model
    m = ARCHITECTURE.fullmatch(base)
    if not m or m["size"] not in SIZES:
        raise ConfigError(
            f"timm architecture '{name[:120]}' is not one vitctl reads",
            hint=f"known: vit_{{{','.join(SIZES)}}}_patch{{P}}_{{res}} and their _xp_ forms; {HINT}",
        )
    width, depth, heads, ratio = SIZES[m["size"]]
    size = {"img_size": int(m["res"]), "patch_size": int(m["patch"]), "embed_dim": width, "depth": depth, "num_heads": heads,
            "mlp_ratio": ratio}  # fmt: skip
    return ("parallel" if m["xp"] else "sequential"), {**DEFAULTS, **size, **(XP if m["xp"] else {})}


def timm_kwargs(hub: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The block and the effective timm kwargs of a timm Hub config.json: the name's defaults, then
    `model_args`, then the top-level `num_classes` / `global_pool` where model_args has none."""
    block, kwargs = architecture_defaults(hub.get("architecture"))
    args = hub.get("model_args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"timm config.json: model_args must be an object, got {type(args).__name__}", hint=HINT)
    unknown = sorted(set(args) - set(kwargs) - TRAINING_ONLY)
    if unknown:
        raise ConfigError(f"timm model_args {', '.join(unknown[:8])}: not arguments vitctl knows how to read", hint=HINT)
    for key in ("num_classes", "global_pool"):
        if key in hub and key not in args:
            kwargs[key] = hub[key]
    return block, {**kwargs, **{k: v for k, v in args.items() if k not in TRAINING_ONLY}}


def _refusals(k: Mapping[str, Any]) -> list[str]:
    """Every reason vitctl's model cannot compute timm's function for kwargs `k`."""
    checks = (
        (k["reg_tokens"] != 0, f"register tokens (reg_tokens {k['reg_tokens']!r})"),
        (not _known(k["global_pool"], POOLS), f"global_pool {k['global_pool']!r} (vitctl pools token, avg, map or none)"),
        (bool(k["class_token"]) != (k["global_pool"] == "token"), f"a class token {'with' if k['class_token'] else 'without'} global_pool {k['global_pool']!r}"),
        (not _known(k["act_layer"], ACTS), f"act_layer {k['act_layer']!r} (vitctl computes gelu or gelu_tanh)"),
        (not _known(k["norm_layer"], NORMS), f"norm_layer {k['norm_layer']!r} (vitctl computes LayerNorm or RmsNorm)"),
        (k["pos_embed"] != "learn", f"pos_embed {k['pos_embed']!r} (vitctl reads a learned position embedding)"),
        (bool(k["dynamic_img_size"] or k["dynamic_img_pad"]), "dynamic_img_size / dynamic_img_pad (vitctl runs at one image size)"),
        (bool(k["scale_attn_norm"] or k["scale_mlp_norm"]), "scale_attn_norm / scale_mlp_norm (norms inside attention or MLP)"),
        (k["embed_norm_layer"] is not None, f"embed_norm_layer {k['embed_norm_layer']!r} (a norm inside the patch embedding)"),
        (not k["final_norm"], "final_norm false (vitctl's model always has its final norm)"),
        (bool(k["pool_include_prefix"]) and bool(k["class_token"]), "pool_include_prefix with a class token"),
        (not isinstance(k["init_values"], (int, float, type(None))) or (k["init_values"] or 0) < 0, f"init_values {k['init_values']!r}"),
    )  # fmt: skip
    return [why for bad, why in checks if bad]


def _known(value: Any, table: Mapping[Any, Any]) -> bool:
    """`value` is a key of `table` (a list or dict from a hostile config.json is not, rather than unhashable)."""
    return isinstance(value, (str, type(None))) and value in table


def _shape_sizes(shapes: Mapping[str, tuple[int, ...]], block: str, class_posemb: bool) -> dict[str, int]:
    """The sizes the tensors give: width, channels, patch, depth, mlp_dim, classes, image size."""

    def shape(name: str, ndim: int) -> tuple[int, ...]:
        s = shapes.get(name)
        if s is None or len(s) != ndim:
            raise ConfigError(f"timm checkpoint: {name} is {'missing' if s is None else f'of shape {tuple(s)}'}", hint=HINT)
        return tuple(s)

    width, channels, p, q = shape("patch_embed.proj.weight", 4)
    if p != q:
        raise ConfigError(f"timm checkpoint: patch_embed.proj.weight has non-square {p}x{q} patches", hint=HINT)
    layers = {int(m[1]) for n in shapes if (m := re.match(r"blocks\.(\d{1,6})\.", n))}
    depth = max(layers) + 1 if layers else 0
    rows = shape("blocks.0.mlp.fc1.weight" if block == "sequential" else "blocks.0.in_proj.weight", 2)[0]
    mlp_dim = rows if block == "sequential" else rows - 3 * width
    tokens = shape("pos_embed", 3)[1] - class_posemb
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens:
        raise ConfigError(f"timm checkpoint: pos_embed holds {tokens} patch rows, not a square grid", hint=HINT)
    classes = shape("head.weight", 2)[0] if "head.weight" in shapes else 0
    return {"width": width, "channels": channels, "patch_size": p, "depth": depth, "mlp_dim": mlp_dim,
            "num_classes": classes, "image_size": grid * p}  # fmt: skip


def _check_stated_sizes(k: Mapping[str, Any], got: Mapping[str, int]) -> None:
    """Every size config.json states (by the name's table or model_args) against the tensors'."""
    img = k["img_size"]
    stated = {
        "width": k["embed_dim"], "depth": k["depth"], "channels": k["in_chans"], "patch_size": k["patch_size"],
        "num_classes": k["num_classes"], "image_size": img if isinstance(img, int) else tuple(img) if isinstance(img, list) else img,
        "mlp_dim": int(k["mlp_ratio"] * k["embed_dim"]) if isinstance(k["mlp_ratio"], (int, float)) else k["mlp_ratio"],
    }  # fmt: skip
    if isinstance(stated["image_size"], tuple) and len(set(stated["image_size"])) == 1:
        stated["image_size"] = stated["image_size"][0]
    lies = [f"{n} {stated[n]!r:.40} (the tensors: {got[n]})" for n in stated if stated[n] is not None and stated[n] != got[n]]
    if lies:
        raise ConfigError(
            f"timm config.json does not describe its tensors: it states {'; '.join(lies)}",
            hint="the config.json or the weights are damaged, or belong to another model",
        )


def timm_config(hub: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> tuple[ViTConfig, list[str]]:
    """The ViTConfig of a timm Hub directory (its config.json `hub`, its tensors' `shapes`), and notes
    on what the reading assumed. Raises ConfigError naming whatever vitctl cannot express."""
    block, k = timm_kwargs(hub)
    refusals = _refusals(k)
    if refusals:
        raise ConfigError(
            f"timm model {hub.get('architecture')!r:.80} has what vitctl's model cannot compute: {'; '.join(refusals)}", hint=HINT
        )
    class_posemb = bool(k["class_token"]) and not k["no_embed_class"]
    sizes = _shape_sizes(shapes, block, class_posemb)
    _check_stated_sizes(k, sizes)
    heads = k["num_heads"]
    if not isinstance(heads, int) or isinstance(heads, bool) or not BOUNDS["num_heads"][0] <= heads <= BOUNDS["num_heads"][1]:
        raise ConfigError(f"timm config.json: num_heads {heads!r:.40} is not a head count", hint="set model_args.num_heads in config.json")
    norm, pool = NORMS[k["norm_layer"]], POOLS[k["global_pool"]]
    use_fc_norm = k["global_pool"] == "avg" if k["fc_norm"] is None else bool(k["fc_norm"])
    cfg = ViTConfig(
        **sizes, num_heads=heads, block=block, qk_norm=bool(k["qk_norm"]), qkv_bias=bool(k["qkv_bias"]),
        attn_out_bias=bool(k["proj_bias"]), mlp_bias=bool(k["proj_bias"]), norm=norm, norm_bias=norm == "layernorm",
        norm_eps=NORM_EPS, gelu_approximate=ACTS[k["act_layer"]], pool=pool, posemb="learn", class_posemb=class_posemb,
        norm_pre=bool(k["pre_norm"]), fc_norm=use_fc_norm, layer_scale=float(k["init_values"] or 0.0),
        head_zero_init=False, preprocess=_preprocess(hub.get("pretrained_cfg")),
    )  # fmt: skip
    notes = [f"timm {hub.get('architecture')}: read as vitctl's {block} block, pool {pool}"]
    if k["pre_norm"]:
        notes.append("timm's pre_norm model has no patch-embedding bias: vitctl's reads as zeros (the same function)")
    if isinstance(hub.get("pretrained_cfg"), dict) and hub["pretrained_cfg"].get("crop_pct", 1.0) != 1.0:
        notes.append(f"pretrained_cfg.crop_pct {hub['pretrained_cfg']['crop_pct']!r:.20} is not carried: vitctl resizes the whole image")
    return cfg, notes


def _preprocess(pretrained: Any) -> dict[str, Any]:
    """timm's pretrained_cfg (mean, std on [0, 1] pixels; interpolation) as vitctl's preprocess; timm's
    ImageNet defaults where it names none."""
    p = pretrained if isinstance(pretrained, dict) else {}
    interpolation = p.get("interpolation", "bicubic")
    return {
        "resize": interpolation if interpolation in CHOICES["resize"] else "bicubic",
        "antialias": True,  # timm's eval transform resizes PIL images, which antialiases
        "value_range": None,
        "mean": p.get("mean", (0.485, 0.456, 0.406)),
        "std": p.get("std", (0.229, 0.224, 0.225)),
    }


def class_names(hub: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """timm's `label_names` (one string per class), if config.json has them."""
    names = hub.get("label_names")
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) and len(n) < 1024 for n in names):
        return list(names)
    return None
