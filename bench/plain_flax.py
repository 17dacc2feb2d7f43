"""The plain Flax baseline of `vitctl bench`: vitctl's ViT written the straightforward way in
Flax NNX, as a user would from the paper, without vitctl's tricks (no fused or split-K
projections, no reshape-matmul patch embedding, no stacked blocks or scan, no
dot_product_attention):
- nnx.Conv patches, nnx.Linear q/k/v/out and MLP, nnx.LayerNorm / nnx.RMSNorm;
- a Python list of blocks, softmax attention by jnp.einsum;
- fp32 only.
Built shapes-only (nnx.eval_shape) and filled from vitctl-jax's flat parameters, so it
computes the same function as vitctl-jax's model; attribute names follow vitctl's so the
parameters map by name. Shape letters: B batch, S query tokens, T tokens, D width,
N heads, K head_dim, F mlp_dim, P patch.

`vitctl bench` imports this file from the source checkout (vitctl.bench.models.plain_flax).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitctl.params import random_weights
from vitctl.posemb import posemb_sincos_2d


def norm(cfg, dim: int, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm == "layernorm":
        return nnx.LayerNorm(dim, epsilon=cfg.norm_eps, use_bias=cfg.norm_bias, rngs=rngs)
    return nnx.RMSNorm(dim, epsilon=cfg.norm_eps, rngs=rngs)


class Attention(nnx.Module):
    """q from x_q, k and v from x_kv; the probe of a MAP head is x_q."""

    def __init__(self, cfg, rngs: nnx.Rngs, qk_norm: bool = False):
        D, K = cfg.width, cfg.head_dim
        self.cfg = cfg
        self.q, self.k, self.v = (nnx.Linear(D, D, use_bias=cfg.qkv_bias, rngs=rngs) for _ in range(3))
        self.q_norm, self.k_norm = (norm(cfg, K, rngs), norm(cfg, K, rngs)) if qk_norm else (None, None)
        self.attn_out = nnx.Linear(D, D, use_bias=cfg.attn_out_bias, rngs=rngs)

    def __call__(self, xq, xkv):
        N, K = self.cfg.num_heads, self.cfg.head_dim
        B, S, T = xq.shape[0], xq.shape[1], xkv.shape[1]
        q, k, v = self.q(xq).reshape(B, S, N, K), self.k(xkv).reshape(B, T, N, K), self.v(xkv).reshape(B, T, N, K)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        probs = jax.nn.softmax(jnp.einsum("bsnk,btnk->bnst", q, k) / K**0.5, axis=-1)
        return self.attn_out(jnp.einsum("bnst,btnk->bsnk", probs, v).reshape(B, S, N * K))


class AttentionMLP(Attention):
    """Attention + a norm and a GELU MLP."""

    def __init__(self, cfg, rngs: nnx.Rngs, qk_norm: bool = False):
        super().__init__(cfg, rngs, qk_norm)
        D, F = cfg.width, cfg.mlp_dim
        self.norm = norm(cfg, D, rngs)
        self.mlp_in = nnx.Linear(D, F, use_bias=cfg.mlp_bias, rngs=rngs)
        self.mlp_out = nnx.Linear(F, D, use_bias=cfg.mlp_bias, rngs=rngs)

    def mlp(self, h):
        return self.mlp_out(jax.nn.gelu(self.mlp_in(h), approximate=self.cfg.gelu_approximate))


class Block(AttentionMLP):
    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs, qk_norm=cfg.qk_norm)
        self.mlp_norm = norm(cfg, cfg.width, rngs) if cfg.block == "sequential" else None

    def __call__(self, x):
        h = self.norm(x)
        if self.cfg.block == "parallel":  # y = x + Attn(N(x)) + MLP(N(x))
            return x + super().__call__(h, h) + self.mlp(h)
        x = x + super().__call__(h, h)
        return x + self.mlp(self.mlp_norm(x))


class MAPHead(AttentionMLP):
    """big_vision's: a learned probe attends over the tokens."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.probe = nnx.Param(jnp.zeros((1, 1, cfg.width)))

    def __call__(self, x):
        x = super().__call__(jnp.broadcast_to(self.probe[...], (x.shape[0], 1, self.cfg.width)), x)
        return (x + self.mlp(self.norm(x)))[:, 0]


class PlainViT(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        D, P = cfg.width, cfg.patch_size
        self.cfg = cfg
        self.patch_embed = nnx.Conv(cfg.channels, D, (P, P), strides=(P, P), padding="VALID", rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, cfg.num_patches, D))) if cfg.posemb == "learn" else None
        self.cls_token = nnx.Param(jnp.zeros((1, 1, D))) if cfg.pool == "tok" else None
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.norm = norm(cfg, D, rngs)
        self.map_head = MAPHead(cfg, rngs) if cfg.pool == "map" else None
        self.head = nnx.Linear(D, cfg.num_classes, rngs=rngs) if cfg.num_classes else None

    def __call__(self, images):  # [B, H, W, C] -> logits
        cfg, D = self.cfg, self.cfg.width
        x = self.patch_embed(images).reshape(images.shape[0], -1, D)
        x = x + (self.pos_embed[...] if self.pos_embed is not None else posemb_sincos_2d(cfg.grid, cfg.grid, D))
        if self.cls_token is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, D)), x], 1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        x = self.map_head(x) if cfg.pool == "map" else x.mean(1) if cfg.pool == "gap" else x[:, 0]
        return self.head(x) if self.head is not None else x


def plain_flax_model(cfg, flat: dict | None = None) -> PlainViT:
    """PlainViT for `cfg`, built shapes-only and filled from `flat`, vitctl-jax's flat
    parameters (default: random_weights(cfg))."""
    if cfg.dtype != "float32" or (cfg.norm == "rmsnorm" and cfg.norm_bias):
        raise ValueError("the plain Flax baseline supports fp32 and RMSNorm without bias only")
    model = nnx.eval_shape(lambda: PlainViT(cfg, nnx.Rngs(0)))
    flat = random_weights(cfg) if flat is None else flat
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):  # "blocks/3/q/kernel" <- vitctl's "blocks/q/kernel"[3]
        path = [str(p) for p in path]
        name = "/".join(["blocks", *path[2:]] if path[0] == "blocks" else path).replace("patch_embed/", "patch_embed/proj/")
        w = flat[name][int(path[1])] if path[0] == "blocks" else flat[name]
        var.set_value(jnp.asarray(w, jnp.float32).reshape(var.get_value().shape))  # (D, N, K) -> (D, N*K) etc.
    nnx.update(model, state)
    return model


def plain_flax_forward(cfg, batch: int) -> tuple[Callable[[], None], float]:
    """plain_flax_model jitted over its split state, as vitctl.bench.models.jax_forward does
    vitctl-jax's, on the same input; returns (synchronised call, compile seconds)."""
    graphdef, state = nnx.split(plain_flax_model(cfg))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels)), jnp.float32)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(state, x))), compile_s
