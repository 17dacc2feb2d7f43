"""Test-only reference: big_vision's ViT (models/vit.py) re-written in flax linen.

Written from reading google-research/big_vision `big_vision/models/vit.py` (2024) and
`big_vision/utils.py`, not copied. Module and parameter names are big_vision's, so that
`init` produces the real checkpoint key layout:

    embedding/{kernel,bias}                     nn.Conv, kernel HWIO (P, P, C, D)
    pos_embedding                               (1, h*w, D), posemb "learn" only
    cls                                         (1, 1, D), pool_type "tok" only
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
        LayerNorm_1, MlpBlock_0/Dense_{0,1}     scan=False
    Transformer/encoderblock/...                scan=True: nn.scan over nn.remat(block), leading depth axis
    Transformer/encoder_norm                    applied before pooling
    MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
    pre_logits/{kernel,bias}                    rep_size only (Dense + tanh)
    head/{kernel,bias}

Defaults relied on, as big_vision does: nn.LayerNorm (epsilon 1e-6, bias, fast variance),
nn.gelu (approximate=True: tanh), nn.MultiHeadDotProductAttention (use_bias=True).
Dropout is left out (inference only).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def posemb_sincos_2d(h, w, width, temperature=10_000.0, dtype=jnp.float32):
    """big_vision's formula, computed as big_vision computes it: in jnp (float32 without x64)."""
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
    y = jnp.einsum("m,d->md", y.flatten(), omega)
    x = jnp.einsum("m,d->md", x.flatten(), omega)
    return jnp.asarray(jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1), dtype)[None]


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        h = nn.gelu(nn.Dense(self.mlp_dim)(x))  # Dense_0 (flax numbers modules in creation order)
        return nn.Dense(d)(h)  # Dense_1


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x, deterministic=True):
        y = nn.LayerNorm()(x)  # LayerNorm_0
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, deterministic=deterministic)(y, y)
        y = nn.LayerNorm()(x)  # LayerNorm_1
        x = x + MlpBlock(self.mlp_dim)(y)  # MlpBlock_0
        return x, x  # (carry, per-block output), the shape nn.scan wants


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    scan: bool = False

    @nn.compact
    def __call__(self, x, deterministic=True):
        kw = {"mlp_dim": self.mlp_dim, "num_heads": self.num_heads}
        if self.scan:
            block = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,))  # 0: self, 2: deterministic
            scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast, length=self.depth)
            x, per_block = scanned(name="encoderblock", **kw)(x, deterministic)
            blocks = [per_block[i] for i in range(self.depth)]
        else:
            blocks = []
            for i in range(self.depth):
                x, _ = Encoder1DBlock(name=f"encoderblock_{i}", **kw)(x, deterministic)
                blocks.append(x)
        return nn.LayerNorm(name="encoder_norm")(x), blocks


class MAPHead(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x):
        n, _, d = x.shape
        probe = jnp.tile(self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype), [n, 1, 1])
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(probe, x)  # no norm before it
        y = nn.LayerNorm()(x)
        x = x + MlpBlock(self.mlp_dim)(y)
        return x[:, 0]


class ViT(nn.Module):
    num_classes: int = 0
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    posemb: str = "learn"  # or "sincos2d"
    pool_type: str = "gap"  # or "map", "tok"
    rep_size: int = 0
    scan: bool = False

    @nn.compact
    def __call__(self, image):
        out = {}
        P = (self.patch_size, self.patch_size)
        x = nn.Conv(self.width, P, strides=P, padding="VALID", name="embedding")(image)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.posemb == "learn":
            x = x + self.param("pos_embedding", nn.initializers.normal(stddev=c**-0.5), (1, h * w, c), x.dtype)
        else:
            x = x + posemb_sincos_2d(h, w, c, dtype=x.dtype)
        if self.pool_type == "tok":  # the class token comes after the position embedding
            x = jnp.concatenate([jnp.tile(self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype), [n, 1, 1]), x], axis=1)
        x, out["blocks"] = Encoder(self.depth, self.mlp_dim, self.num_heads, self.scan, name="Transformer")(x)
        out["encoded"] = x
        if self.pool_type == "map":
            x = MAPHead(self.mlp_dim, self.num_heads)(x)
        elif self.pool_type == "gap":
            x = x.mean(axis=1)
        elif self.pool_type == "tok":
            x = x[:, 0]
        else:
            raise ValueError(f"Unknown pool type: '{self.pool_type}'")
        if self.rep_size:
            x = nn.tanh(nn.Dense(self.rep_size, name="pre_logits")(x))
        out["pre_logits"] = x
        if self.num_classes:
            x = nn.Dense(self.num_classes, name="head")(x)
        out["logits"] = x
        return x, out


# --- big_vision's checkpoint side ---------------------------------------------------------


def flatten_with_names(tree: Any, prefix: str = "") -> dict[str, Any]:
    """big_vision's utils.tree_flatten_with_names naming: sorted dict keys, "/"-joined."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        out = {}
        for k in sorted(tree.keys()):
            out.update(flatten_with_names(tree[k], f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): tree}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for k, v in flat.items():
        node = tree
        *path, leaf = k.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def random_params(model: ViT, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat float32 params of `model` where every tensor holds distinct, non-trivial values
    (big_vision's own init zeroes the head and the class token and nearly zeroes MLP biases,
    which would hide mapping errors)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))["params"]
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in flatten_with_names(shapes).items():
        shape, leaf = s.shape, name.split("/")[-1]
        scanned = "/encoderblock/" in f"/{name}"
        per_layer = shape[1:] if scanned else shape
        if leaf == "kernel":
            fan_in = per_layer[0] if name.split("/")[-2] in ("query", "key", "value") else int(np.prod(per_layer[:-1]))
            w = rng.normal(0, fan_in**-0.5, shape)
        elif leaf == "scale":
            w = 1 + rng.normal(0, 0.1, shape)
        else:  # biases, pos_embedding, cls, probe
            w = rng.normal(0, 0.1 if leaf == "bias" else 0.5, shape)
        out[name] = w.astype(np.float32)
    return out


def apply(model: ViT, flat: dict[str, np.ndarray], images: np.ndarray):
    """(logits, out) of the reference on the given flat params."""
    return model.apply({"params": unflatten({k: jnp.asarray(v) for k, v in flat.items()})}, jnp.asarray(images))


def save_npz(path, flat: dict[str, np.ndarray], prefix: str = "", extra: dict[str, np.ndarray] | None = None) -> None:
    """As big_vision's npz checkpoints are written: np.savez of the "/"-named leaves, so a bfloat16
    array lands on disk as 2-byte void ('|V2')."""
    arrays = {prefix + k: np.asarray(v) for k, v in flat.items()}
    arrays.update(extra or {})
    with open(path, "wb") as f:
        np.savez(f, **{k: arrays[k] for k in sorted(arrays)})
