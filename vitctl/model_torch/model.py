"""ViT-22B-style Vision Transformer in PyTorch (arXiv:2302.05442).

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
- Dense(in_shape, out_shape): weight prod(out_shape) + in_shape, nn.Linear's layout.
- Attention: F.scaled_dot_product_attention (softmax accumulates in float32).
- Blocks are an nn.ModuleList (JAX stores them stacked; the mapping unstacks).
- GEMMs go through cpu_bf16: bf16 compute on a CPU without bf16 units multiplies the
  bf16 values in fp32 and rounds once.

Shapes: B batch, T tokens, D width, N heads, K head_dim, F mlp_dim, L depth, P patch,
C channels. Input images are NCHW (torchvision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitctl.config import ViTConfig
from vitctl.model_torch.cpu_bf16 import accumulator, linear
from vitctl.posemb import posemb_sincos_2d

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def xavier_uniform(w):
    """flax's xavier_uniform on the matching kernel: fans over the flattened (out, in) axes."""
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    return w


def lecun_normal(w):
    """flax's lecun_normal: normal(1/sqrt(fan_in)) truncated at 2 std, the std corrected for the cut."""
    std = 1.0 / math.sqrt(w[0].numel()) / 0.87962566
    return nn.init.trunc_normal_(w, std=std, a=-2.0 * std, b=2.0 * std)


class Dense(nn.Module):
    """A linear map from x's trailing in_shape axes to out_shape axes (either may be several, as (N, K))."""

    def __init__(self, cfg, in_shape, out_shape, *, bias, init=None):
        super().__init__()
        n_in, dtype = len(in_shape), DTYPES[cfg.param_dtype]
        init = init or xavier_uniform
        # weight: prod(out_shape) + in_shape, the transpose of JAX's kernel with the out axes
        # flattened (nn.Linear's (d_out, d_in)); bias: prod(out_shape).
        self.weight = nn.Parameter(init(torch.empty(math.prod(out_shape), *in_shape, dtype=dtype)))
        self.bias = nn.Parameter(torch.zeros(math.prod(out_shape), dtype=dtype)) if bias else None
        self.n_in = n_in
        self.out_shape = tuple(out_shape)

    def forward(self, x):
        y = linear(x.flatten(-self.n_in), self.weight.flatten(1), self.bias)
        return y.unflatten(-1, self.out_shape)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, cfg, dim):
        super().__init__()
        dtype = DTYPES[cfg.param_dtype]
        self.weight = nn.Parameter(torch.ones((dim,), dtype=dtype))
        self.bias = nn.Parameter(torch.zeros((dim,), dtype=dtype)) if cfg.norm_bias else None
        self.center, self.eps = cfg.norm == "layernorm", cfg.norm_eps

    def forward(self, x):
        # One fused kernel each (the same centered formula as the JAX side, not
        # E[x^2]-E[x]^2): ~4x less time than the six elementwise passes of the formula.
        y, w = x.to(torch.float32), self.weight.to(torch.float32)
        b = None if self.bias is None else self.bias.to(torch.float32)
        if self.center:
            return F.layer_norm(y, y.shape[-1:], w, b, self.eps).to(x.dtype)
        y = F.rms_norm(y, y.shape[-1:], w, self.eps)
        return (y if b is None else y + b).to(x.dtype)


def attention(q, k, v, cfg):
    """q: [B, S, N, K], k/v: [B, T, N, K] -> [B, S, N, K]; softmax per cfg.softmax_dtype."""
    if cfg.softmax_dtype == "float32" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)  # SDPA: (B, N, T, K)
    logits = torch.einsum("BSNK,BTNK->BNST", q, k) * (q.shape[-1] ** -0.5)  # softmax in bf16
    return torch.einsum("BNST,BTNK->BSNK", F.softmax(logits, -1), v)


def gelu(h, cfg):
    return F.gelu(h, approximate="tanh" if cfg.gelu_approximate else "none")


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> D, as a reshape and one matmul (same as a stride-P conv)."""

    def __init__(self, cfg):
        super().__init__()
        P, C, D = cfg.patch_size, cfg.channels, cfg.width
        init = lecun_normal
        self.proj = Dense(cfg, (C, P, P), (D,), bias=True, init=init)  # weight (D, C, P, P): a conv's layout
        self.patch_size = P

    def embed(self, x):  # patches [B, T, D] -> the blocks' input: position embedding, class token, norm_pre
        cfg = self.cfg
        if not cfg.class_posemb:
            x = x + self.pos_embed.to(x.dtype)
        if self.cls_token is not None:  # big_vision: the class token gets no position embedding (timm, HF: class_posemb)
            x = torch.concatenate([torch.broadcast_to(self.cls_token.to(x.dtype), (x.shape[0], 1, cfg.width)), x], 1)
        if cfg.class_posemb:
            x = x + self.pos_embed.to(x.dtype)
        return x if self.norm_pre is None else self.norm_pre(x)

    def forward(self, images):  # [B, C, H, W] -> [B, T, D]
        B, C, H, W = images.shape
        P = self.patch_size
        x = images.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, P, P)
        return self.proj(x.reshape(B, -1, C, P, P))


class Block(nn.Module):
    """Parallel (ViT-22B) or sequential (classic ViT) transformer block."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, N, K, F_ = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        self.norm = Norm(cfg, D)
        self.q = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias)
        self.k = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias)
        self.v = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias)
        self.q_norm = Norm(cfg, K) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, K) if cfg.qk_norm else None
        self.attn_out = Dense(cfg, (N * K,), (D,), bias=cfg.attn_out_bias)  # weight (D, N*K)
        self.mlp_norm = Norm(cfg, D) if cfg.block == "sequential" else None
        self.mlp_in = Dense(cfg, (D,), (F_,), bias=cfg.mlp_bias)
        self.mlp_out = Dense(cfg, (F_,), (D,), bias=cfg.mlp_bias)
        self.ls_attn = LayerScale(cfg, D) if cfg.layer_scale else None
        self.ls_mlp = LayerScale(cfg, D) if cfg.layer_scale else None
        self.cfg = cfg

    def attend(self, q, k, v):  # [B, T, N, K] each -> [B, T, N*K]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return attention(q, k, v, self.cfg).flatten(-2)

    def forward(self, x):  # [B, T, D] -> [B, T, D]
        cfg = self.cfg
        if self.ls_attn is not None:
            return self.scaled(x)
        if cfg.block == "sequential":
            h = self.norm(x)
            x = add_projections(x, (self.attend(*self.qkv(h)), self.attn_out))
            return add_projections(x, (gelu(self.mlp_in(self.mlp_norm(x)), cfg), self.mlp_out))
        h = self.norm(x)
        if not cfg.fused:
            return x + self.attn_out(self.attend(self.q(h), self.k(h), self.v(h))) + self.mlp_out(gelu(self.mlp_in(h), cfg))
        # The paper's fusion, in the form that is fastest for a CPU BLAS (docs/performance.md):
        # attention-out and MLP-out accumulate into one (B, T, D) output, a split-K form of
        # the one (D, NK+F) matmul. The in-projections run as four GEMMs on the same h:
        # concatenating their weights costs a copy per call and gains nothing, since each
        # GEMM already runs at the BLAS's peak at these sizes.
        a = self.attend(self.q(h), self.k(h), self.v(h))
        return add_projections(x, (a, self.attn_out), (gelu(self.mlp_in(h), cfg), self.mlp_out))

    def qkv(self, h):  # [B, T, D] -> q, k, v [B, T, N, K] each (the sequential block's)
        # Without autograd: one GEMM on the three weights concatenated per call (timm's qkv);
        # at ViT-Ti/16 (D 192) ~7% less time than three narrow GEMMs, the weight copy included,
        # and the same logits bit for bit on this CPU. With autograd the three run as written.
        if torch.is_grad_enabled():
            return self.q(h), self.k(h), self.v(h)
        q, k, v = self.q, self.k, self.v
        b = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
        qkv = linear(h, torch.cat([q.weight, k.weight, v.weight]), b)
        return qkv.unflatten(-1, (3, *q.out_shape)).unbind(-3)

    def scaled(self, x):  # layer scale: each branch's output (its bias included) times a learned vector, unfused
        cfg = self.cfg
        h = self.norm(x)
        a = self.ls_attn(self.attn_out(self.attend(self.q(h), self.k(h), self.v(h))))
        if cfg.block == "sequential":
            x = x + a
            return x + self.ls_mlp(self.mlp_out(gelu(self.mlp_in(self.mlp_norm(x)), cfg)))
        return x + a + self.ls_mlp(self.mlp_out(gelu(self.mlp_in(h), cfg)))


class LayerScale(nn.Module):
    """x * weight, per channel (DINOv2, timm's init_values): weight starts at cfg.layer_scale."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), cfg.layer_scale, dtype=DTYPES[cfg.param_dtype]))

    def forward(self, x):
        return x * self.weight.to(x.dtype)


def add_projections(x, *pairs):
    """x + sum(dense(a) for a, dense in pairs): one output that starts as the residual
    plus the biases, then each projection's matmul is added on."""
    dt, acc = x.dtype, accumulator(x)
    biases = [m.bias for _, m in pairs if m.bias is not None]
    y = x.to(acc) + sum(biases).to(dt).to(acc) if biases else x.to(acc, copy=True)
    for a, m in pairs:  # in place (addmm_, beta=1): no bias copy and no separate add pass per projection
        y.view(-1, y.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]).to(acc), m.weight.to(dt).to(acc).t())
    return y.to(dt)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead): a learned probe attends over tokens."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, N, K, F_ = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        self.probe = nn.Parameter(xavier_uniform(torch.empty((1, 1, D), dtype=DTYPES[cfg.param_dtype])))
        self.q = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias)
        self.k = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias)
        self.v = Dense(cfg, (D,), (N, K), bias=cfg.qkv_bias)
        self.attn_out = Dense(cfg, (N * K,), (D,), bias=cfg.attn_out_bias)  # weight (D, N*K)
        self.norm = Norm(cfg, D)
        self.mlp_in = Dense(cfg, (D,), (F_,), bias=cfg.mlp_bias)
        self.mlp_out = Dense(cfg, (F_,), (D,), bias=cfg.mlp_bias)
        self.cfg = cfg

    def forward(self, x):  # [B, T, D] -> [B, D]
        probe = torch.broadcast_to(self.probe.to(x.dtype), (x.shape[0], 1, x.shape[2]))
        x = self.attn_out(attention(self.q(probe), self.k(x), self.v(x), self.cfg).flatten(-2))  # (B, 1, D)
        x = x + self.mlp_out(gelu(self.mlp_in(self.norm(x)), self.cfg))
        return x[:, 0]


class ViT(nn.Module):
    """Returns (logits, out); out holds named intermediates for verify."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, dtype = cfg.width, DTYPES[cfg.param_dtype]
        self.patch_embed = PatchEmbed(cfg)
        if cfg.posemb == "learn":
            pos = nn.init.normal_(torch.empty((1, cfg.posemb_len, D), dtype=dtype), std=D**-0.5)
            self.pos_embed = nn.Parameter(pos)
        else:
            self.register_buffer("pos_embed", torch.from_numpy(posemb_sincos_2d(cfg.grid, cfg.grid, D)), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros((1, 1, D), dtype=dtype)) if cfg.pool == "tok" else None
        self.norm_pre = Norm(cfg, D) if cfg.norm_pre else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = Norm(cfg, D)
        self.map_head = MAPHead(cfg) if cfg.pool == "map" else None
        head_init = nn.init.zeros_ if cfg.head_zero_init else xavier_uniform
        if cfg.num_classes:
            self.head = Dense(cfg, (D,), (cfg.num_classes,), bias=True, init=head_init)
        else:
            self.head = None
        self.cfg = cfg

    def run_blocks(self, x):  # [B, T, D] -> [B, T, D], L x [B, T, D]
        ys = []
        for block in self.blocks:
            x = block(x)
            ys.append(x)
        return x, ys

    def embed(self, x):  # patches [B, T, D] -> the blocks' input: position embedding, class token, norm_pre
        cfg = self.cfg
        if not cfg.class_posemb:
            x = x + self.pos_embed.to(x.dtype)
        if self.cls_token is not None:  # big_vision: the class token gets no position embedding (timm, HF: class_posemb)
            x = torch.concatenate([torch.broadcast_to(self.cls_token.to(x.dtype), (x.shape[0], 1, cfg.width)), x], 1)
        if cfg.class_posemb:
            x = x + self.pos_embed.to(x.dtype)
        return x if self.norm_pre is None else self.norm_pre(x)

    def forward(self, images):  # [B, C, H, W]
        cfg, out = self.cfg, {}
        x = out["patch_embed"] = self.patch_embed(images.to(DTYPES[cfg.dtype]))
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
    torch.manual_seed(seed)  # torch's global generator, the one nn.init draws from
    return ViT(cfg)


def abstract_model(cfg: ViTConfig) -> ViT:
    """The model's shapes and dtypes, with no memory allocated."""
    with torch.device("meta"):  # tensors without storage; load_state_dict(..., assign=True) fills them
        return ViT(cfg)
