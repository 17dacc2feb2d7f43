"""ViT-22B-style Vision Transformer in PyTorch (arXiv:2302.05442).

Line for line the twin of vitctl/model_jax/model.py: same classes, same order, same
attribute names, so state_dict keys differ from JAX paths only by separator and leaf
(`blocks.3.q.weight` <-> `blocks/q/kernel`; see vitctl/convert/mapping.py).

- Parallel block: y = x + Attn(N(x)) + MLP(N(x)); one norm feeds both branches. With
  cfg.fused the forward runs the paper's output fusion as split-K: attention-out and
  MLP-out accumulate onto residual + biases in one buffer (parameters stay separate;
  measurements in docs/performance.md).
- Sequential block (classic big_vision ViT) with its second norm `mlp_norm`.
- QK-norm over head_dim on queries and keys; optional biases everywhere (cfg).
- Norms computed in float32 by one formula on both sides (centered for layernorm), here
  with torch's fused F.layer_norm / F.rms_norm kernels.
- Attention: F.scaled_dot_product_attention (softmax accumulates in float32).
- bf16 compute on a CPU without bf16 units (no AVX512_BF16 or AMX: torch's bf16 GEMM
  then runs ~6x slower than its fp32 GEMM): every GEMM multiplies the bf16 values in
  fp32 and rounds the result to bf16 once, which is what a bf16 GEMM with fp32
  accumulation computes (`linear`, `add_projections`; docs/performance.md).
- Blocks are an nn.ModuleList (JAX stores them stacked; the mapping unstacks).

Input images are NCHW (torchvision). Shapes: B batch, T tokens, D width, N heads,
K head_dim, F mlp_dim, L depth, P patch, C channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitctl.config import ViTConfig
from vitctl.posemb import posemb_sincos_2d

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cpu_has_bf16() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


CPU_BF16 = _cpu_has_bf16()


def gemm_in_fp32(x) -> bool:
    """True when a bf16 GEMM on x's device is better run in fp32 on the bf16 values (see above)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not CPU_BF16


def linear(x, weight, bias=None):
    """F.linear in x's dtype, weights cast to it (fp32 parameters serve bf16 compute)."""
    dt = x.dtype
    b = None if bias is None else bias.to(dt)
    if gemm_in_fp32(x):
        return F.linear(x.float(), weight.to(dt).float(), None if b is None else b.float()).to(dt)
    return F.linear(x, weight.to(dt), b)


class Dense(nn.Linear):
    """nn.Linear (weight (d_out, d_in), the transpose of JAX's flattened kernel) that
    computes in the input's dtype, so fp32 parameters serve bf16 compute."""

    def __init__(self, cfg, d_in, d_out, *, bias):
        super().__init__(d_in, d_out, bias=bias, dtype=DTYPES[cfg.param_dtype])

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, cfg, dim):
        super().__init__()
        dtype = DTYPES[cfg.param_dtype]
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype)) if cfg.norm_bias else None
        self.center, self.eps = cfg.norm == "layernorm", cfg.norm_eps

    def forward(self, x):
        # One fused kernel each (the same centered formula as the JAX side, not
        # E[x^2]-E[x]^2): ~4x less time than the six elementwise passes of the formula.
        y, w = x.float(), self.weight.float()
        b = None if self.bias is None else self.bias.float()
        if self.center:
            return F.layer_norm(y, y.shape[-1:], w, b, self.eps).to(x.dtype)
        y = F.rms_norm(y, y.shape[-1:], w, self.eps)
        return (y if b is None else y + b).to(x.dtype)


def attention(q, k, v, cfg):
    """q: [B, S, N, K], k/v: [B, T, N, K] -> [B, S, N, K]; softmax per cfg.softmax_dtype."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, T, K)
    if cfg.softmax_dtype == "float32" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    logits = torch.einsum("bnsk,bntk->bnst", q, k) * (q.shape[-1] ** -0.5)  # softmax in bf16
    return torch.einsum("bnst,bntk->bnsk", logits.softmax(-1), v).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> D, as a reshape and one matmul (same as a stride-P conv)."""

    def __init__(self, cfg):
        super().__init__()
        P, C, D = cfg.patch_size, cfg.channels, cfg.width
        self.proj = nn.Conv2d(C, D, P, stride=P, dtype=DTYPES[cfg.param_dtype])  # weight (D, C, P, P)
        self.patch_size = P

    def forward(self, images):  # [B, C, H, W] -> [B, T, D]
        B, C, H, W = images.shape
        P = self.patch_size
        x = images.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, P, P)
        w = self.proj.weight.reshape(self.proj.out_channels, -1).to(x.dtype)  # (D, C*P*P)
        return linear(x.reshape(B, -1, C * P * P), w, self.proj.bias)


class Block(nn.Module):
    """Parallel (ViT-22B) or sequential (classic ViT) transformer block."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, N, K, F_ = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        self.norm = Norm(cfg, D)
        self.q = Dense(cfg, D, N * K, bias=cfg.qkv_bias)
        self.k = Dense(cfg, D, N * K, bias=cfg.qkv_bias)
        self.v = Dense(cfg, D, N * K, bias=cfg.qkv_bias)
        self.q_norm = Norm(cfg, K) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, K) if cfg.qk_norm else None
        self.attn_out = Dense(cfg, N * K, D, bias=cfg.attn_out_bias)
        self.mlp_norm = Norm(cfg, D) if cfg.block == "sequential" else None
        self.mlp_in = Dense(cfg, D, F_, bias=cfg.mlp_bias)
        self.mlp_out = Dense(cfg, F_, D, bias=cfg.mlp_bias)
        self.cfg = cfg

    def attend(self, q, k, v):  # [B, T, N*K] each -> [B, T, N*K]
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, self.cfg.num_heads, self.cfg.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return attention(q, k, v, self.cfg).reshape(B, T, -1)

    def gelu(self, h):
        return F.gelu(h, approximate="tanh" if self.cfg.gelu_approximate else "none")

    def forward(self, x):  # [B, T, D] -> [B, T, D]
        cfg = self.cfg
        if cfg.block == "sequential":
            h = self.norm(x)
            x = add_projections(x, (self.attend(self.q(h), self.k(h), self.v(h)), self.attn_out))
            return add_projections(x, (self.gelu(self.mlp_in(self.mlp_norm(x))), self.mlp_out))
        h = self.norm(x)
        if not cfg.fused:
            return x + self.attn_out(self.attend(self.q(h), self.k(h), self.v(h))) + self.mlp_out(self.gelu(self.mlp_in(h)))
        # The paper's fusion, in the form that is fastest for a CPU BLAS (docs/performance.md):
        # attention-out and MLP-out accumulate into one (B, T, D) output, a split-K form of
        # the one (D, NK+F) matmul. The in-projections run as four GEMMs on the same h:
        # concatenating their weights costs a copy per call and gains nothing, since each
        # GEMM already runs at the BLAS's peak at these sizes.
        a = self.attend(self.q(h), self.k(h), self.v(h))
        return add_projections(x, (a, self.attn_out), (self.gelu(self.mlp_in(h)), self.mlp_out))


def add_projections(x, *pairs):
    """x + sum(dense(a) for a, dense in pairs), all into one new buffer: it starts as the
    residual plus the biases, then each GEMM accumulates into it (addmm_, beta=1). This
    saves the bias copy and the separate add pass of `x + dense(a)` per projection."""
    dt = x.dtype
    acc = torch.float32 if gemm_in_fp32(x) else dt  # bf16 on a CPU without bf16 units: accumulate in fp32, round once
    biases = [m.bias for _, m in pairs if m.bias is not None]
    y = x.to(acc) + sum(biases).to(dt).to(acc) if biases else x.to(acc, copy=True)
    flat = y.view(-1, y.shape[-1])
    for a, m in pairs:
        flat.addmm_(a.reshape(-1, a.shape[-1]).to(acc), m.weight.to(dt).to(acc).t())
    return y.to(dt)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead): a learned probe attends over tokens."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, N, K, F_ = cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
        self.probe = nn.Parameter(torch.zeros(1, 1, D, dtype=DTYPES[cfg.param_dtype]))
        self.q = Dense(cfg, D, N * K, bias=cfg.qkv_bias)
        self.k = Dense(cfg, D, N * K, bias=cfg.qkv_bias)
        self.v = Dense(cfg, D, N * K, bias=cfg.qkv_bias)
        self.attn_out = Dense(cfg, N * K, D, bias=cfg.attn_out_bias)
        self.norm = Norm(cfg, D)
        self.mlp_in = Dense(cfg, D, F_, bias=cfg.mlp_bias)
        self.mlp_out = Dense(cfg, F_, D, bias=cfg.mlp_bias)
        self.cfg = cfg

    def forward(self, x):  # [B, T, D] -> [B, D]
        B, T, D = x.shape
        N, K = self.cfg.num_heads, self.cfg.head_dim
        probe = self.probe.to(x.dtype).expand(B, 1, D)
        a = attention(self.q(probe).view(B, 1, N, K), self.k(x).view(B, T, N, K), self.v(x).view(B, T, N, K), self.cfg)
        x = self.attn_out(a.reshape(B, 1, N * K))  # (B, 1, D)
        x = x + self.mlp_out(F.gelu(self.mlp_in(self.norm(x)), approximate="tanh" if self.cfg.gelu_approximate else "none"))
        return x[:, 0]


class ViT(nn.Module):
    """Returns (logits, out); out holds named intermediates for verify."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, dtype = cfg.width, DTYPES[cfg.param_dtype]
        self.patch_embed = PatchEmbed(cfg)
        if cfg.posemb == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, D, dtype=dtype))
        else:
            pos = torch.from_numpy(posemb_sincos_2d(cfg.grid, cfg.grid, D))
            self.register_buffer("pos_embed", pos, persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D, dtype=dtype)) if cfg.pool == "tok" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = Norm(cfg, D)
        self.map_head = MAPHead(cfg) if cfg.pool == "map" else None
        self.head = Dense(cfg, D, cfg.num_classes, bias=True) if cfg.num_classes else None
        self.cfg = cfg
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """big_vision's initialisers: xavier-uniform dense kernels, lecun-normal patch
        embedding, normal(1/sqrt(D)) position embedding, zero biases and head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj
        std = 1.0 / math.sqrt(proj.weight[0].numel()) / 0.87962566  # flax lecun_normal: truncated at 2 std
        nn.init.trunc_normal_(proj.weight, std=std, a=-2.0 * std, b=2.0 * std)
        nn.init.zeros_(proj.bias)
        if self.cfg.posemb == "learn":
            nn.init.normal_(self.pos_embed, std=self.cfg.width**-0.5)
        if self.map_head is not None:
            nn.init.xavier_uniform_(self.map_head.probe.view(1, -1))
        if self.head is not None and self.cfg.head_zero_init:
            nn.init.zeros_(self.head.weight)

    def forward(self, images):  # [B, C, H, W]
        cfg, out = self.cfg, {}
        x = out["patch_embed"] = self.patch_embed(images.to(DTYPES[cfg.dtype]))
        x = x + self.pos_embed.to(x.dtype)
        if self.cls_token is not None:  # big_vision: the class token gets no position embedding
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, cfg.width), x], 1)
        out["embed"] = x
        for i, block in enumerate(self.blocks):
            x = out[f"block{i:02d}"] = block(x)
        x = out["encoded"] = self.norm(x)  # big_vision: the final norm comes before pooling
        if cfg.pool == "map":
            x = self.map_head(x)
        elif cfg.pool == "gap":
            x = x.mean(1)
        elif cfg.pool == "tok":
            x = x[:, 0]
        out["pre_logits"] = x
        logits = out["logits"] = self.head(x) if self.head is not None else x
        return logits, out
