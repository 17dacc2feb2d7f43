"""ViTConfig: the one description of a model, shared by the JAX and PyTorch halves.

Stdlib only: importing this module loads neither jax nor torch (nor numpy).

Every numerics-relevant choice is an explicit, serialized field, never a framework
default (each is a known way two ViTs silently disagree): norm type and epsilon, GELU form, softmax dtype,
QK-norm, each bias, pooling, position embedding, head init, preprocessing.

Shape letters used across vitctl: B batch, T tokens, D width, N heads, K head_dim,
F mlp_dim, L layers (depth), P patch, C channels.

Presets (`ViTConfig.from_variant(name)`):
- "vit-22b": ViT-22B/14, arXiv:2302.05442 Table 1 (D=6144, L=48, F=24576, N=48):
  parallel block, QK-norm, no QKV/norm biases, RMS-style norms, MAP head.
- "vit22b-{v}/{p}": the same block at smaller sizes, v in VARIANTS or "1B".
- "{v}/{p}": the classic big_vision ViT (sequential block, biases, LayerNorm eps 1e-6,
  tanh GELU as flax's default, class token), so that real big_vision checkpoints load.
- "vit-G/14", "vit-e/14": the classic ViT-G/14 (arXiv:2106.04560) and ViT-e/14
  (arXiv:2209.06794) with a MAP head, the paper's comparison points.
- "vit22b-demo/4": the paper's block at D=64, L=4, F=256, N=4, patch 4: the model of
  `vitctl demo` and of the README's first `vitctl train` (at 16 px, 16 tokens).

`check_patch_grid` refuses a config that gives fewer than 2 patches per side (one token:
attention has nothing to attend to); commands that build a model to train or run call it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

from vitctl.errors import ConfigError
from vitctl.untrusted import parse_json, read_json

# (D, L, F, N). Reference: big_vision models/vit.py `decode_variant`; So400m from
# arXiv:2305.13035; G from Table 2 of arXiv:2106.04560; e from arXiv:2209.06794.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
# Sizes that only exist with the paper's block. 22B: arXiv:2302.05442 Table 1,
# 48 * (4*D^2 + 2*D*F) = 21,743,271,936 block-matmul parameters. 1B: a ~1.2B
# model of the same shape family (head_dim 128), for single-accelerator checks.
PAPER_VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "1B": (2048, 24, 8192, 16),
    "22B": (6144, 48, 24576, 48),
}
PATCH_SIZES = (8, 14, 16, 32)
# Small models of the paper's block for small images: name -> ((D, L, F, N), patch, fields).
# "demo": the `vitctl demo` recipe (measured in cli/demo.py); its image size, channels and
# classes are those of digits (8x8 upsampled to 16 px: 4x4 patches), which `vitctl train`
# replaces by the data's.
SMALL_VARIANTS: dict[str, tuple[tuple[int, int, int, int], int, dict[str, int]]] = {
    "demo": ((64, 4, 256, 4), 4, {"image_size": 16, "channels": 1, "num_classes": 10}),
}
MIN_GRID = 2  # patches per side: one patch is one token, and attention over one token is the identity

# (lowest, highest) value of each size field. A config may come from anyone (a Hub repo, a
# downloaded checkpoint), and commands build per-layer names, shapes and buffers from these
# before any weight is read: the bounds keep a 1 KB file from asking for millions of layers.
# Each is far above any published ViT (ViT-22B: D=6144, L=48, F=24576, N=48) and above
# ViT-22B grown several times in every direction.
BOUNDS: dict[str, tuple[int, int]] = {
    "width": (1, 2**16),
    "depth": (1, 4096),
    "mlp_dim": (1, 2**20),
    "num_heads": (1, 4096),
    "patch_size": (1, 1024),
    "image_size": (1, 8192),
    "channels": (1, 4096),
    "num_classes": (0, 2**24),
}
# Derived sizes a command allocates per image before any weight is read: the pixels of one
# input image (C * H * W values: 8192 px RGB is 0.2G) and its tokens (ViT-22B/14 at 224 px: 256).
MAX_PIXELS = 2**30
MAX_PATCHES = 2**20

CHOICES: dict[str, tuple[str, ...]] = {
    "block": ("parallel", "sequential"),
    "norm": ("rmsnorm", "layernorm"),
    "pool": ("map", "gap", "tok", "none"),
    "posemb": ("learn", "sincos2d"),
    "softmax_dtype": ("float32", "compute"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "resize": ("bilinear", "bicubic", "nearest"),
}


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How images become model input: resize, then map pixel values.

    Exactly one of `value_range` (big_vision: uint8 [0, 255] -> [lo, hi]) or
    `mean`/`std` (torchvision style, on [0, 1] values) is set.
    """

    resize: str = "bilinear"
    antialias: bool = False  # big_vision's tf.image.resize default
    value_range: tuple[float, float] | None = (-1.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        _check_choice("preprocess.resize", self.resize, CHOICES["resize"])
        has_range = self.value_range is not None
        has_stats = self.mean is not None or self.std is not None
        if has_range == has_stats:
            raise ConfigError(
                "preprocess: set exactly one of value_range or mean/std",
                hint='use e.g. "value_range": [-1, 1] or "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]',
            )
        if has_stats and (self.mean is None or self.std is None or len(self.mean) != len(self.std)):
            raise ConfigError("preprocess: mean and std must both be set, with one value per channel")
        if has_stats and any(s <= 0 for s in self.std):
            raise ConfigError("preprocess.std: every value must be positive")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    # Size.
    width: int = 768  # D
    depth: int = 12  # L
    mlp_dim: int = 3072  # F
    num_heads: int = 12  # N; head_dim K = D // N
    patch_size: int = 16  # P
    image_size: int = 224
    channels: int = 3  # C
    num_classes: int = 1000  # 0: no classifier, logits are the pre-logits
    # Architecture.
    block: str = "parallel"  # arXiv:2302.05442 sec. 2: y = x + Attn(N(x)) + MLP(N(x))
    qk_norm: bool = True  # arXiv:2302.05442 sec. 2: norm over K on q and k
    qkv_bias: bool = False
    attn_out_bias: bool = True
    mlp_bias: bool = True
    norm: str = "rmsnorm"  # rmsnorm: no centering; layernorm: centered
    norm_bias: bool = False
    norm_eps: float = 1e-6  # set explicitly: flax defaults to 1e-6, torch to 1e-5
    gelu_approximate: bool = False  # set explicitly: jax.nn.gelu defaults to tanh, torch to erf
    pool: str = "map"  # big_vision MAPHead; final norm always comes before pooling
    posemb: str = "learn"
    class_posemb: bool = False  # timm's default, HF ViT: the learned posemb's first row is the class token's
    norm_pre: bool = False  # CLIP's ln_pre, timm's norm_pre: a norm on the embedded tokens, before the blocks
    fc_norm: bool = False  # timm's fc_norm: the final norm comes after pooling instead of before it
    layer_scale: float = 0.0  # DINOv2, timm's init_values: per-channel branch scales, initialised to this; 0: none
    # Numerics.
    softmax_dtype: str = "float32"  # "compute": softmax in the compute dtype
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    head_zero_init: bool = True  # big_vision default; logits are 0 at init
    # Forward-pass options that do not change the function.
    fused: bool = True  # parallel block: attn-out and MLP-out accumulate into one output (the paper's output fusion, split-K)
    scan_layers: bool = True  # JAX: lax.scan over the stacked blocks (compile time flat in L)
    remat: bool = False  # JAX: recompute block activations in the backward pass
    preprocess: Preprocess = dataclasses.field(default_factory=Preprocess)

    def __post_init__(self):
        if isinstance(self.preprocess, dict):  # from JSON
            object.__setattr__(self, "preprocess", _preprocess_from_dict(self.preprocess))
        if not isinstance(self.preprocess, Preprocess):
            raise ConfigError(f"preprocess must be an object, got {self.preprocess!r}", hint='e.g. "preprocess": {"value_range": [-1, 1]}')
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
            if f.name in CHOICES:
                _check_choice(f.name, value, CHOICES[f.name])
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if value < lo:
                raise ConfigError(f"{name} must be positive, got {value}" if lo == 1 else f"{name} must be >= {lo}, got {value}")
            if value > hi:
                raise ConfigError(
                    f"{name} must be in the range {lo} to {hi:,}, got {_short(value)}",
                    hint=f"{hi:,} is far above any real model (ViT-22B: width 6144, depth 48, mlp_dim 24576); the config is damaged",
                )
        if self.width % self.num_heads:
            raise ConfigError(
                f"width {self.width} is not divisible by num_heads {self.num_heads}",
                hint="pick num_heads so that head_dim = width / num_heads is an integer",
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}",
                hint=f"use an image_size that is a multiple of {self.patch_size}",
            )
        if self.image_size**2 * self.channels > MAX_PIXELS:
            raise ConfigError(
                f"image_size {self.image_size} with {self.channels} channels is {self.image_size**2 * self.channels:,} values per image, "
                f"more than {MAX_PIXELS:,}",
                hint="use a smaller image_size or fewer channels",
            )
        if self.num_patches > MAX_PATCHES:
            raise ConfigError(
                f"image_size {self.image_size} with patch_size {self.patch_size} is {self.num_patches:,} tokens per image, "
                f"more than {MAX_PATCHES:,}",
                hint="use a larger patch_size or a smaller image_size",
            )
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            raise ConfigError(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if self.class_posemb and (self.posemb != "learn" or self.pool != "tok"):
            raise ConfigError(
                f"class_posemb needs a learned position embedding and a class token (posemb learn, pool tok), got posemb {self.posemb}, pool {self.pool}",
                hint="set class_posemb to false, or use posemb learn with pool tok",
            )
        ls = self.layer_scale
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not (math.isfinite(ls) and ls >= 0):
            raise ConfigError(f"layer_scale must be 0 (none) or a positive initial value, got {ls!r}", hint="DINOv2 and timm use 1e-5")
        if self.posemb == "sincos2d" and self.width % 4:
            raise ConfigError(f"posemb sincos2d needs width divisible by 4, got {self.width}")

    # Derived sizes.
    @property
    def head_dim(self) -> int:  # K
        return self.width // self.num_heads

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def check_patch_grid(self, name: str = "the model") -> None:
        """Refuses a config with fewer than MIN_GRID patches per side: its one token has nothing to attend to.

        Valid as a config (a checkpoint may hold one), but training or running it is a mistake:
        e.g. a patch-16 preset on 16-px digits sees the whole image as one token.
        """
        if self.grid >= MIN_GRID:
            return
        need = MIN_GRID * self.patch_size
        raise ConfigError(
            f"{name} cuts {self.image_size}-px images into {self.grid}x{self.grid} patch of {self.patch_size} px: "
            f"one token, so attention has nothing to attend to",
            hint=f"use a preset with a smaller patch (for small images: --model vit22b-demo/4), "
            f"or upsample the input: --image-size {need} or more (a multiple of {self.patch_size})",
        )

    @property
    def seq_len(self) -> int:  # T: patches, plus the class token for pool="tok"
        return self.num_patches + (self.pool == "tok")

    @property
    def posemb_len(self) -> int:  # rows of the learned position embedding: the patches, and the class token with class_posemb
        return self.num_patches + self.class_posemb

    # Constructors and I/O.
    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ViTConfig:
        """A preset by name ("vit-22b", "vit22b-B/16", "B/16", "vit-G/14"), with overrides."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(
                f"unknown model preset '{name}'",
                hint=(hint + " " if hint else "") + "run `vitctl models` to list the presets",
            )
        return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown config field(s): {', '.join(unknown)}",
                hint=f"known fields: {', '.join(sorted(known))}",
            )
        try:
            return cls(**d)
        except TypeError as e:  # a field of the wrong kind, e.g. a list for an int
            raise ConfigError(f"invalid config: {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> ViTConfig:
        return cls.from_dict(parse_json(text, source, ConfigError, expect=None))


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {field} '{value}'",
            hint=f"{field} must be one of: {', '.join(choices)}",
        )


def _short(value: Any) -> str:
    """An int for a message: a 10,000-digit one from a hostile file is shown by its size."""
    return f"{value:,}" if abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"


def _numbers(field: str, value: Any, length: int | None = None) -> tuple[float, ...] | None:
    """A JSON list of finite numbers (of `length`, if given) as a tuple; None stays None."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and 0 < len(value) <= BOUNDS["channels"][1] and (length is None or len(value) == length)
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        want = f"a list of {length} numbers" if length else "a list of numbers, one per channel"
        raise ConfigError(f"preprocess.{field} must be {want}, got {value!r:.80}")
    return tuple(value)


def _preprocess_from_dict(d: dict[str, Any]) -> Preprocess:
    known = {f.name for f in dataclasses.fields(Preprocess)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown preprocess field(s): {', '.join(unknown)}", hint=f"known fields: {', '.join(sorted(known))}")
    if not isinstance(d.get("antialias", False), bool):
        raise ConfigError(f"preprocess.antialias must be true or false, got {d['antialias']!r}")
    d = {**d, **{k: _numbers(k, d[k], 2 if k == "value_range" else None) for k in ("value_range", "mean", "std") if k in d}}
    return Preprocess(**d)


def _make_presets() -> dict[str, ViTConfig]:
    classic = {
        "block": "sequential", "qk_norm": False, "qkv_bias": True, "attn_out_bias": True, "mlp_bias": True,
        "norm": "layernorm", "norm_bias": True, "norm_eps": 1e-6, "gelu_approximate": True,  # flax nn.gelu
        "pool": "tok",
    }  # fmt: skip
    paper = {"block": "parallel", "qk_norm": True, "qkv_bias": False, "norm": "rmsnorm", "norm_bias": False, "pool": "map"}
    presets = {}
    for v, (d, l, f, n) in VARIANTS.items():
        for p in PATCH_SIZES:
            size = {"width": d, "depth": l, "mlp_dim": f, "num_heads": n, "patch_size": p}
            presets[f"{v}/{p}"] = ViTConfig(**size, **classic)
            if v in ("mu", "Ti", "S", "B", "L", "H") and p in (14, 16):
                presets[f"vit22b-{v}/{p}"] = ViTConfig(**size, **paper)
    for v, (d, l, f, n) in PAPER_VARIANTS.items():
        presets[f"vit22b-{v}/14"] = ViTConfig(width=d, depth=l, mlp_dim=f, num_heads=n, patch_size=14, **paper)
    for v, ((d, l, f, n), p, fields) in SMALL_VARIANTS.items():
        presets[f"vit22b-{v}/{p}"] = ViTConfig(width=d, depth=l, mlp_dim=f, num_heads=n, patch_size=p, **fields, **paper)
    presets["vit-22b"] = presets["vit22b-22B/14"]
    presets["vit-G/14"] = dataclasses.replace(presets["G/14"], pool="map")
    presets["vit-e/14"] = dataclasses.replace(presets["e/14"], pool="map")
    return presets


PRESETS: dict[str, ViTConfig] = _make_presets()


def load_config(path: str | Path) -> ViTConfig:
    """Reads a config.json (a checkpoint directory's, or a bare file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no config.json at {path}",
            hint="a checkpoint directory holds config.json beside its weights; create one with `vitctl init`",
        )
    d = read_json(path, ConfigError)  # bounded: the file may come from anyone
    try:
        return ViTConfig.from_dict(d.get("model", d))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", hint=e.hint) from None
