"""ViT-22B-style Vision Transformer in Flax NNX (arXiv:2302.05442).

One of the twin models, model_jax/model.py and model_torch/model.py: the same classes
and functions, in the same order, with the same attribute names, so a JAX parameter path
and its PyTorch state_dict key differ only by separator, block index and leaf name, as
the parameter table in vitctl/params.py spells out.

- Parallel block: y = x + Attn(N(x)) + MLP(N(x)); one norm feeds both branches. With
  cfg.fused the forward runs the paper's output fusion as split-K: attention-out and
  MLP-out accumulate onto residual + biases in one buffer (parameters stay separate;
  measurements in docs/performance.md).
- Sequential block (classic big_vision ViT) with its second norm `mlp_norm`.
- The options public ViTs need (timm, Hugging Face, CLIP, DINOv2): a position for the
  class token (class_posemb), a norm before the blocks (norm_pre), the final norm after
  pooling (fc_norm), per-channel branch scales (layer_scale; such a block runs unfused).
- QK-norm over head_dim on queries and keys; optional biases everywhere (cfg).
- Norms computed in float32 by one formula on both sides (centered for layernorm).
- Dense(in_shape, out_shape): kernel in_shape + out_shape, heads kept as (N, K) axes.
- Attention: jax.nn.dot_product_attention (logits and softmax in float32).
- Blocks are stored stacked (leading L axis, logical axis "layers"); cfg.scan_layers
  runs them with nnx.scan (compile time flat in depth), else a Python loop.
- Every parameter carries logical axis names (`axes`, stored as `out_sharding`),
  resolved to mesh axes by model_jax/sharding.py.

Shapes: B batch, T tokens, D width, N heads, K head_dim, F mlp_dim, L depth, P patch,
C channels. Input images are NHWC (big_vision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitctl.config import ViTConfig
from vitctl.posemb import posemb_sincos_2d

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT = nnx.initializers


class Dense(nnx.Module):
    """A linear map from x's trailing in_shape axes to out_shape axes (either may be several, as (N, K))."""

    def __init__(self, cfg, in_shape, out_shape, *, bias, init=None, axes, rngs):
        n_in, dtype = len(in_shape), DTYPES[cfg.param_dtype]
        # Fans over the flattened in/out axes, so (D, N, K) initialises like (D, N*K).
        init = init or INIT.xavier_uniform(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out_shape))))
        # kernel: in_shape + out_shape, heads kept as (N, K) axes; bias: out_shape.
        self.kernel = nnx.Param(init(rngs.params(), (*in_shape, *out_shape), dtype), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros(out_shape, dtype), out_sharding=axes[n_in:]) if bias else None
        self.n_in = n_in

    def __call__(self, x):
        y = jnp.tensordot(x, self.kernel[...].astype(x.dtype), axes=self.n_in)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, cfg, dim, *, axis):
        dtype = DTYPES[cfg.param_dtype]
        self.scale = nnx.Param(jnp.ones((dim,), dtype=dtype), out_sharding=(axis,))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype=dtype), out_sharding=(axis,)) if cfg.norm_bias else None
        self.center, self.eps = cfg.norm == "layernorm", cfg.norm_eps

    def __call__(self, x):
        # The centered formula for layernorm (not E[x^2]-E[x]^2), the one the torch kernels compute.
        y, w = x.astype(jnp.float32), self.scale[...].astype(jnp.float32)
        b = None if self.bias is None else self.bias[...].astype(jnp.float32)
        if self.center:
            y = y - y.mean(-1, keepdims=True)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + self.eps) * w
        return (y if b is None else y + b).astype(x.dtype)


def attention(q, k, v, cfg):
    """q: [B, S, N, K], k/v: [B, T, N, K] -> [B, S, N, K]; softmax per cfg.softmax_dtype."""
    if cfg.softmax_dtype == "float32" or q.dtype == jnp.float32:
        return jax.nn.dot_product_attention(q, k, v)
    logits = jnp.einsum("BSNK,BTNK->BNST", q, k) * (q.shape[-1] ** -0.5)  # softmax in bf16
    return jnp.einsum("BNST,BTNK->BSNK", jax.nn.softmax(logits, -1), v)


def gelu(h, cfg):
    return jax.nn.gelu(h, approximate=cfg.gelu_approximate)


class PatchEmbed(nnx.Module):
    """Non-overlapping P x P patches -> D, as a reshape and one matmul (same as a stride-P conv)."""

    def __init__(self, cfg, *, rngs):
        P, C, D = cfg.patch_size, cfg.channels, cfg.width
        init = INIT.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.proj = Dense(cfg, (P, P, C), (D,), bias=True, init=init, axes=("patch", "patch", "channels", "embed"), rngs=rngs)
        self.patch_size = P

    def embed(self, x):  # patches [B, T, D] -> the blocks' input: position embedding, class token, norm_pre
        cfg = self.cfg
        pos = self.pos_embed[...] if cfg.posemb == "learn" else posemb_sincos_2d(cfg.grid, cfg.grid, cfg.width)
        if not cfg.class_posemb:
            x = x + pos.astype(x.dtype)
        if self.cls_token is not None:  # big_vision: the class token gets no position embedding (timm, HF: class_posemb)
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, cfg.width)), x], 1)
        if cfg.class_posemb:
            x = x + pos.astype(x.dtype)
        return x if self.norm_pre is None else self.norm_pre(x)

    def __call__(self, images):  # [B, H, W, C] -> [B, T, D]
        B, H, W, C = images.shape
        P = self.patch_size
        x = images.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, P, P, C)
        return self.proj(x.reshape(B, -1, P, P, C))


class Block(nnx.Module):
    """Parallel (ViT-22B) or sequential (classic ViT) transformer block."""

    def __init__(self, cfg: ViTConfig, *, rngs):
        D, N, K, F = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        self.norm = Norm(cfg, D, axis="norm")
        self.q = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias, axes=("embed", "heads", "head_dim"), rngs=rngs)
        self.k = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias, axes=("embed", "heads", "head_dim"), rngs=rngs)
        self.v = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias, axes=("embed", "heads", "head_dim"), rngs=rngs)
        self.q_norm = Norm(cfg, K, axis="head_dim") if cfg.qk_norm else None
        self.k_norm = Norm(cfg, K, axis="head_dim") if cfg.qk_norm else None
        self.attn_out = Dense(cfg, (N, K), (D,), bias=cfg.attn_out_bias, axes=("heads", "head_dim", "embed"), rngs=rngs)
        self.mlp_norm = Norm(cfg, D, axis="norm") if cfg.block == "sequential" else None
        self.mlp_in = Dense(cfg, (D,), (F,), bias=cfg.mlp_bias, axes=("embed", "mlp"), rngs=rngs)
        self.mlp_out = Dense(cfg, (F,), (D,), bias=cfg.mlp_bias, axes=("mlp", "embed"), rngs=rngs)
        self.ls_attn = LayerScale(cfg, D) if cfg.layer_scale else None
        self.ls_mlp = LayerScale(cfg, D) if cfg.layer_scale else None
        self.cfg = cfg

    def attend(self, q, k, v):  # [B, T, N, K] each -> [B, T, N, K]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return attention(q, k, v, self.cfg)

    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        cfg = self.cfg
        if self.ls_attn is not None:
            return self.scaled(x)
        if cfg.block == "sequential":
            h = self.norm(x)
            x = add_projections(x, (self.attend(self.q(h), self.k(h), self.v(h)), self.attn_out))
            return add_projections(x, (gelu(self.mlp_in(self.mlp_norm(x)), cfg), self.mlp_out))
        h = self.norm(x)
        if not cfg.fused:
            return x + self.attn_out(self.attend(self.q(h), self.k(h), self.v(h))) + self.mlp_out(gelu(self.mlp_in(h), cfg))
        # The paper's fusion, in the form that is fastest for a CPU BLAS (docs/performance.md):
        # attention-out and MLP-out accumulate into one (B, T, D) output, a split-K form of
        # the one (NK+F, D) matmul. The in-projections run as four GEMMs on the same h:
        # concatenating their weights costs a copy per call and gains nothing, since each
        # GEMM already runs at the BLAS's peak at these sizes.
        a = self.attend(self.q(h), self.k(h), self.v(h))
        return add_projections(x, (a, self.attn_out), (gelu(self.mlp_in(h), cfg), self.mlp_out))

    def scaled(self, x):  # layer scale: each branch's output (its bias included) times a learned vector, unfused
        cfg = self.cfg
        h = self.norm(x)
        a = self.ls_attn(self.attn_out(self.attend(self.q(h), self.k(h), self.v(h))))
        if cfg.block == "sequential":
            x = x + a
            return x + self.ls_mlp(self.mlp_out(gelu(self.mlp_in(self.mlp_norm(x)), cfg)))
        return x + a + self.ls_mlp(self.mlp_out(gelu(self.mlp_in(h), cfg)))


class LayerScale(nnx.Module):
    """x * scale, per channel (DINOv2, timm's init_values): scale starts at cfg.layer_scale."""

    def __init__(self, cfg, dim):
        self.scale = nnx.Param(jnp.full((dim,), cfg.layer_scale, DTYPES[cfg.param_dtype]), out_sharding=("norm",))

    def __call__(self, x):
        return x * self.scale[...].astype(x.dtype)


def add_projections(x, *pairs):
    """x + sum(dense(a) for a, dense in pairs): one output that starts as the residual
    plus the biases, then each projection's matmul is added on."""
    biases = [m.bias[...] for _, m in pairs if m.bias is not None]
    y = x + sum(biases).astype(x.dtype) if biases else x
    for a, m in pairs:
        y = y + jnp.tensordot(a, m.kernel[...].astype(x.dtype), axes=m.n_in)
    return y


class MAPHead(nnx.Module):
    """Multihead attention pooling (big_vision MAPHead): a learned probe attends over tokens."""

    def __init__(self, cfg: ViTConfig, *, rngs):
        D, N, K, F = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        self.probe = nnx.Param(INIT.xavier_uniform()(rngs.params(), (1, 1, D), DTYPES[cfg.param_dtype]), out_sharding=(None, None, "embed"))
        self.q = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias, axes=("embed", "heads", "head_dim"), rngs=rngs)
        self.k = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias, axes=("embed", "heads", "head_dim"), rngs=rngs)
        self.v = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias, axes=("embed", "heads", "head_dim"), rngs=rngs)
        self.attn_out = Dense(cfg, (N, K), (D,), bias=cfg.attn_out_bias, axes=("heads", "head_dim", "embed"), rngs=rngs)
        self.norm = Norm(cfg, D, axis="norm")
        self.mlp_in = Dense(cfg, (D,), (F,), bias=cfg.mlp_bias, axes=("embed", "mlp"), rngs=rngs)
        self.mlp_out = Dense(cfg, (F,), (D,), bias=cfg.mlp_bias, axes=("mlp", "embed"), rngs=rngs)
        self.cfg = cfg

    def __call__(self, x):  # [B, T, D] -> [B, D]
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
        x = self.attn_out(attention(self.q(probe), self.k(x), self.v(x), self.cfg))  # (B, 1, D)
        x = x + self.mlp_out(gelu(self.mlp_in(self.norm(x)), self.cfg))
        return x[:, 0]


class ViT(nnx.Module):
    """Returns (logits, out); out holds named intermediates for verify."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        D, dtype = cfg.width, DTYPES[cfg.param_dtype]
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        if cfg.posemb == "learn":
            pos = INIT.normal(stddev=D**-0.5)(rngs.params(), (1, cfg.posemb_len, D), dtype)
            self.pos_embed = nnx.Param(pos, out_sharding=(None, None, "embed"))
        self.cls_token = nnx.Param(jnp.zeros((1, 1, D), dtype=dtype), out_sharding=(None, None, "embed")) if cfg.pool == "tok" else None
        self.norm_pre = Norm(cfg, D, axis="norm") if cfg.norm_pre else None

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # every parameter stacked: (L, ...)
        self.norm = Norm(cfg, D, axis="norm")
        self.map_head = MAPHead(cfg, rngs=rngs) if cfg.pool == "map" else None
        head_init = INIT.zeros if cfg.head_zero_init else INIT.lecun_normal()
        if cfg.num_classes:
            self.head = Dense(cfg, (D,), (cfg.num_classes,), bias=True, init=head_init, axes=("embed", "classes"), rngs=rngs)
        else:
            self.head = None
        self.cfg = cfg

    def run_blocks(self, x):  # [B, T, D] -> [B, T, D], [L, B, T, D]
        cfg = self.cfg

        def step(block, x):
            y = block(x)
            return y, y

        if cfg.remat:
            step = nnx.remat(step)
        if cfg.scan_layers:
            return nnx.scan(step, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(self.blocks, x)
        graphdef, state = nnx.split(self.blocks)
        ys = []
        for i in range(cfg.depth):
            x, _ = step(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)), x)
            ys.append(x)
        return x, jnp.stack(ys)

    def embed(self, x):  # patches [B, T, D] -> the blocks' input: position embedding, class token, norm_pre
        cfg = self.cfg
        pos = self.pos_embed[...] if cfg.posemb == "learn" else posemb_sincos_2d(cfg.grid, cfg.grid, cfg.width)
        if not cfg.class_posemb:
            x = x + pos.astype(x.dtype)
        if self.cls_token is not None:  # big_vision: the class token gets no position embedding (timm, HF: class_posemb)
            x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, cfg.width)), x], 1)
        if cfg.class_posemb:
            x = x + pos.astype(x.dtype)
        return x if self.norm_pre is None else self.norm_pre(x)

    def __call__(self, images):  # [B, H, W, C]
        cfg, out = self.cfg, {}
        x = out["patch_embed"] = self.patch_embed(images.astype(DTYPES[cfg.dtype]))
        x = out["embed"] = self.embed(x)
        x, per_block = self.run_blocks(x)
        for i in range(cfg.depth):
            out[f"block{i:02d}"] = per_block[i]
        x = out["encoded"] = x if cfg.fc_norm else self.norm(x)  # big_vision: the final norm comes before pooling
        if cfg.pool == "map":
            x = self.map_head(x)
        elif cfg.pool == "gap":
            x = x.mean(1)
        elif cfg.pool == "tok":
            x = x[:, 0]
        x = out["pre_logits"] = self.norm(x) if cfg.fc_norm else x  # timm's fc_norm: after pooling
        logits = out["logits"] = self.head(x) if self.head is not None else x
        return logits, out


def init_model(cfg: ViTConfig, seed: int = 0) -> ViT:
    """A freshly initialised model, drawn from `seed`."""
    with nnx.use_eager_sharding(False):  # sharding annotations stay metadata: no mesh needed
        return ViT(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ViTConfig) -> ViT:
    """The model's shapes and dtypes, with no memory allocated."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))  # jax.eval_shape: abstract arrays only
