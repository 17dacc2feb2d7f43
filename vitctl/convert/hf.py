"""Hugging Face transformers' ViT (`ViTModel`, `ViTForImageClassification`), read and written.

numpy only: transformers is needed to use an export, not to make or read one. HF's ViT is the
classic ViT: sequential block, LayerNorm with bias (eps `layer_norm_eps`, 1e-12 by default),
biases everywhere (q/k/v: `qkv_bias`), a class token with its own position row (class_posemb),
the final layernorm before the classifier on the class token. Its tensors have vitctl's torch
layouts exactly, so the table below is a rename, one row per tensor (`HF_NAMES`, compiled by
params.NameTable), with the vitctl torch names of params.PARAMS as its other side.

- `hf_config(hub, preprocessor)` -> (ViTConfig, notes): from config.json (model_type "vit") and
  preprocessor_config.json. `hidden_act` gelu is exact; gelu_new / gelu_pytorch_tanh are tanh.
  `ViTModel`'s pooler (dense + tanh) is not part of vitctl's model: it is left out, with a note.
- `hf_tensor_names(cfg, prefix)`: the HF name of every vitctl torch tensor, in vitctl's order.
- `hf_hub_config(cfg, class_names)`, `preprocessor_config(cfg)`: what an export writes, so that
  `transformers.AutoModelForImageClassification.from_pretrained(DST)` loads it with no missing or
  unexpected key. Configs HF's ViT cannot express are refused by name (`check_expressible`),
  with the hint to export to timm, which transformers also loads (TimmWrapper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError
from vitctl.params import NameTable

PREFIX = "vit."  # ViTForImageClassification's encoder; ViTModel's has none
ACTS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # hidden_act -> gelu_approximate
POOLER = ("pooler.dense.weight", "pooler.dense.bias")
HINT = "export with --format timm (transformers loads it through TimmWrapper), or --format vitctl"
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # preprocessor_config.json's `resample`
RESAMPLE = {v: k for k, v in PIL_RESAMPLE.items()}


@dataclasses.dataclass(frozen=True)
class HfName:
    hf: str  # after PREFIX (the classifier: before it)
    torch: str  # vitctl torch state_dict key template


_L = "encoder.layer.{i}."
HF_NAMES: tuple[HfName, ...] = (
    HfName("embeddings.cls_token", "cls_token"),
    HfName("embeddings.position_embeddings", "pos_embed"),
    *(HfName(f"embeddings.patch_embeddings.projection.{x}", f"patch_embed.proj.{x}") for x in ("weight", "bias")),
    *(HfName(f"{_L}attention.attention.{hf}.{x}", f"blocks.{{i}}.{ours}.{x}") for hf, ours in (("query", "q"), ("key", "k"), ("value", "v"))
      for x in ("weight", "bias")),
    *(HfName(f"{_L}{hf}.{x}", f"blocks.{{i}}.{ours}.{x}") for hf, ours in (
        ("attention.output.dense", "attn_out"), ("intermediate.dense", "mlp_in"), ("output.dense", "mlp_out"),
        ("layernorm_before", "norm"), ("layernorm_after", "mlp_norm")) for x in ("weight", "bias")),
    *(HfName(f"layernorm.{x}", f"norm.{x}") for x in ("weight", "bias")),
    *(HfName(f"classifier.{x}", f"head.{x}") for x in ("weight", "bias")),
)  # fmt: skip
NAMES = NameTable(HF_NAMES, {"hf": "hf", "torch": "torch"})


def hf_name(torch_name: str, prefix: str) -> str:
    """The HF name of one vitctl torch tensor (`prefix`: "vit." or "" for everything but the classifier)."""
    hits = NAMES.matches(torch_name, "torch")
    if len(hits) != 1:
        raise ConfigError(f"'{torch_name}' has no Hugging Face ViT tensor", hint=HINT)
    row, slots = hits[0]
    name = NAMES.fill(row, "hf", slots)
    return name if name.startswith("classifier.") else prefix + name


# What HF's ViT computes, as vitctl config values (the rest is read from config.json).
FIXED = {
    "block": "sequential", "qk_norm": False, "attn_out_bias": True, "mlp_bias": True, "norm": "layernorm", "norm_bias": True,
    "pool": "tok", "posemb": "learn", "class_posemb": True, "norm_pre": False, "fc_norm": False, "layer_scale": 0.0,
}  # fmt: skip


def check_expressible(cfg: ViTConfig) -> None:
    """Raises ConfigError naming every field whose value HF's ViT class cannot compute."""
    bad = [f"{k} {getattr(cfg, k)!r} (HF's ViT: {v!r})" for k, v in FIXED.items() if getattr(cfg, k) != v]
    if cfg.softmax_dtype == "compute" and cfg.dtype == "bfloat16":
        bad.append("softmax in bfloat16 (HF's ViT has no such option)")
    if bad:
        raise ConfigError("Hugging Face's ViTForImageClassification cannot express this model: " + "; ".join(bad), hint=HINT)


def _size(hub: Mapping[str, Any], key: str, default: int) -> Any:
    """An int field of config.json; HF allows [h, w] for image and patch size: square only."""
    value = hub.get(key, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    if isinstance(value, (list, tuple)):
        raise ConfigError(f"HF config.json: {key} {value!r:.40} is not square", hint="vitctl reads square images and patches")
    return value


def hf_config(hub: Mapping[str, Any], preprocessor: Mapping[str, Any] | None, num_classes: int) -> tuple[ViTConfig, list[str]]:
    """The ViTConfig of an HF ViT directory: config.json (`hub`), preprocessor_config.json (or None:
    HF's defaults) and the classifier's rows (`num_classes`, 0 for a ViTModel). Sizes must then match
    the tensors (the caller's coverage check names any that do not)."""
    if hub.get("model_type") != "vit":
        raise ConfigError(
            f"HF config.json: model_type {hub.get('model_type')!r:.40} is not 'vit'", hint="vitctl reads HF's ViT family only"
        )
    act = hub.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTS:
        raise ConfigError(f"HF config.json: hidden_act {act!r:.40} is not one vitctl computes", hint=f"vitctl reads {', '.join(ACTS)}")
    cfg = ViTConfig(
        width=hub.get("hidden_size", 768), depth=hub.get("num_hidden_layers", 12), mlp_dim=hub.get("intermediate_size", 3072),
        num_heads=hub.get("num_attention_heads", 12), patch_size=_size(hub, "patch_size", 16), image_size=_size(hub, "image_size", 224),
        channels=hub.get("num_channels", 3), num_classes=num_classes, qkv_bias=hub.get("qkv_bias", True),
        norm_eps=hub.get("layer_norm_eps", 1e-12), gelu_approximate=ACTS[act], head_zero_init=False,
        preprocess=_preprocess(preprocessor), **FIXED,
    )  # fmt: skip
    return cfg, [] if preprocessor is not None else ["no preprocessor_config.json: HF's defaults (mean = std = 0.5, bilinear)"]


def _preprocess(p: Mapping[str, Any] | None) -> dict[str, Any]:
    p = p or {}
    resample = p.get("resample", 2)
    return {
        "resize": PIL_RESAMPLE.get(resample, "bilinear") if isinstance(resample, int) else "bilinear",
        "antialias": True,  # HF's image processors resize with PIL, which antialiases
        "value_range": None,
        "mean": p.get("image_mean", [0.5, 0.5, 0.5]),
        "std": p.get("image_std", [0.5, 0.5, 0.5]),
    }


def class_names(hub: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """id2label as a list (one string per class index), if config.json has a complete one."""
    labels = hub.get("id2label")
    if not isinstance(labels, dict) or len(labels) != num_classes:
        return None
    names = [labels.get(str(i)) for i in range(num_classes)]
    return names if all(isinstance(n, str) and len(n) < 1024 for n in names) else None


def hf_hub_config(cfg: ViTConfig, class_names: Any = None) -> dict[str, Any]:
    """HF's config.json for `cfg` (ViTForImageClassification); `class_names` become id2label."""
    check_expressible(cfg)
    if not (isinstance(class_names, list) and len(class_names) == cfg.num_classes and all(isinstance(c, str) for c in class_names)):
        class_names = [f"LABEL_{i}" for i in range(cfg.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "intermediate_size": cfg.mlp_dim,
        "num_attention_heads": cfg.num_heads, "patch_size": cfg.patch_size, "image_size": cfg.image_size,
        "num_channels": cfg.channels, "qkv_bias": cfg.qkv_bias, "layer_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu_pytorch_tanh" if cfg.gelu_approximate else "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): n for i, n in enumerate(class_names)},
        "label2id": {n: i for i, n in enumerate(class_names)} if len(set(class_names)) == len(class_names) else {},
    }  # fmt: skip


def preprocessor_config(cfg: ViTConfig) -> dict[str, Any]:
    """HF's ViTImageProcessor settings for cfg.preprocess: value_range (lo, hi) on uint8 pixels is
    rescale to [0, 1] then mean -lo / (hi - lo), std 1 / (hi - lo)."""
    p, size = cfg.preprocess, cfg.image_size
    if p.value_range is not None:
        lo, hi = p.value_range
        mean, std = [-lo / (hi - lo)] * cfg.channels, [1.0 / (hi - lo)] * cfg.channels
    else:
        mean, std = list(p.mean), list(p.std)
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": RESAMPLE[p.resize], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": mean, "image_std": std,
    }  # fmt: skip
