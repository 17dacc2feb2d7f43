"""Per-device memory plan for training on a (data, fsdp, tensor) mesh, from shapes alone.

Nothing is allocated and no jax Mesh is built: parameter names and shapes come from
vitctl.params.jax_param_shapes, their logical axes from the model itself
(`abstract_model`, i.e. jax.eval_shape, about 0.5 s for ViT-22B), resolved to mesh axes by
the one rules table in vitctl.model_jax.sharding. The mesh is hypothetical: shard sizes
are arithmetic, ceil(dim / prod(sizes of the dim's mesh axes)), and every dimension that
does not divide is listed (XLA pads such shards; the ceiling is what a device holds).

Formulas (per device; b = B / (data * fsdp), n = N / tensor, f = F / tensor; bytes of
the compute dtype `a`, of the softmax `s` (4 when cfg.softmax_dtype is float32)):
- params: sum over parameters of prod(shard shape) * bytes(param_dtype).
- grads: the same (gradients have the parameters' dtype and sharding).
- optimizer, states in float32 and sharded like their parameters:
  - adamw (optax.adamw): mu and nu, 2 * 4 bytes per parameter element, + the step count.
  - adafactor (optax.adafactor defaults: factored=True, min_dim_size_to_factor=128,
    momentum=None, i.e. no first moment): a parameter whose second-largest dimension is
    >= 128 keeps v_row (the shape without its largest dim) and v_col (without the
    second largest), each sharded as the parameter minus the dropped dim, plus a (1,)
    placeholder v; any other parameter keeps a full v plus two (1,) placeholders.
    Stacked block parameters carry their leading L axis, as optax sees them.
    `momentum_dtype="bfloat16"` adds big_vision's first moment (arXiv:2106.04560 sec. 3.4).
- activations: what jax.grad saves for vitctl's Block (checked term by term against
  jax's saved-residuals list, and per layer against XLA's compiled temp memory in the
  tests). Per layer, with a = bytes of the compute dtype, s = of the softmax:
  norm: the input upcast to float32, its normalised form (float32) and the output,
  2*(b,T,D)*4 + (b,T,D)*a; with QK-norm, q and k upcast and normalised 4*(b,T,n,K)*4
  plus v and the scaled q, k 3*(b,T,n,K)*a (without: q, k, v 3*(b,T,n,K)*a); softmax
  exp and probabilities (b,n,T,T)*(s + a), or only the softmax statistics (b,n,T)
  float32 with flash-style attention (--flash-attention; vitctl's model does not use
  it); attention output (b,T,n*K)*a; the MLP hidden and GELU's intermediates,
  4*(b,T,f)*a for the erf form, 6 for tanh; the sequential block a second norm. Statistics of
  size (b,T) or (b,n,T) are left out. Without remat all L layers keep these; with full
  remat (nnx.remat over the block, nothing saveable) only the L block inputs (b,T,D)*a
  stay, plus one layer's set, recomputed in the backward pass. The stem and head are
  not rematerialised and count in both: the images (b,H,W,C), the last block output
  and final norm output 2*(b,T,D), the MAP head's k and v 2*(b,T,n,K), logits float32.
- workspace (a stated allowance, the same with and without remat): one layer's weights
  gathered over data and fsdp (still sharded over tensor) twice, for the weights and
  their gradient before the reduce-scatter, at the parameter dtype; plus one layer's
  activation gradients, taken as large as its saved activations.
- total = params + grads + optimizer + activations + workspace (total_remat likewise).

Shapes: B batch, T tokens, D width, N heads, K head_dim, F mlp_dim, L depth, H/W image, C channels.
"""

from __future__ import annotations

import math
from typing import Any

from vitctl.config import ViTConfig
from vitctl.errors import ConfigError
from vitctl.model_jax.sharding import MESH_AXES, parse_mesh
from vitctl.params import check_coverage, is_stacked, jax_param_shapes

BYTES = {"float32": 4, "bfloat16": 2}
OPTIMIZERS = ("adamw", "adafactor")
ADAFACTOR_MIN_DIM_TO_FACTOR = 128  # optax.adafactor's min_dim_size_to_factor
DEFAULT_HBM = "32GiB"  # TPU v4, on which ViT-22B was trained (arXiv:2302.05442)

Spec = tuple[tuple[str, ...], ...]  # per dimension: the mesh axes it is sharded over


def param_specs(cfg: ViTConfig) -> dict[str, tuple[tuple[int, ...], Spec]]:
    """{name: (shape, per-dimension mesh axes)} for every parameter, stacked; nothing allocated."""
    from flax import nnx

    from vitctl.model_jax.model import abstract_model  # jax.eval_shape: shapes only
    from vitctl.model_jax.sharding import param_specs as model_specs

    shapes = jax_param_shapes(cfg)
    model = abstract_model(cfg)
    got = {"/".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    check_coverage(got, shapes, "the JAX model's parameters")  # the mapping table and the model agree
    specs = model_specs(model)
    return {n: (shape, tuple(_axes(e) for e in specs[n])) for n, shape in shapes.items()}


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_shape(shape: tuple[int, ...], spec: Spec, mesh: dict[str, int]) -> tuple[int, ...]:
    """What one device holds: ceil(dim / devices over the dim's mesh axes) per dimension."""
    return tuple(-(-d // math.prod(mesh[a] for a in axes)) for d, axes in zip(shape, spec))


def indivisible(name: str, shape: tuple[int, ...], spec: Spec, mesh: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        n = math.prod(mesh[a] for a in axes)
        if size % n:
            out.append({"param": name, "dim": dim, "size": size, "mesh_axes": list(axes), "devices": n})
    return out


def optimizer_states(
    shape: tuple[int, ...], spec: Spec, optimizer: str, momentum_dtype: str | None = None
) -> list[tuple[tuple[int, ...], Spec, int]]:
    """The optimizer state arrays kept for one parameter: [(shape, spec, bytes per element)]."""
    if optimizer == "adamw":
        return [(shape, spec, 4), (shape, spec, 4)]  # mu, nu
    if optimizer == "sgd":
        return [(shape, spec, 4)]  # the momentum trace (none without momentum; counted, as the default has it)
    if optimizer != "adafactor":
        raise ConfigError(f"unknown optimizer '{optimizer}'", hint=f"optimizer must be one of: {', '.join(OPTIMIZERS)}")
    states = [(shape, spec, BYTES[momentum_dtype])] if momentum_dtype else []
    placeholder = ((1,), ((),), 4)
    order = sorted(range(len(shape)), key=lambda i: shape[i])  # np.argsort order, as optax
    if len(shape) >= 2 and shape[order[-2]] >= ADAFACTOR_MIN_DIM_TO_FACTOR:
        drop = lambda i: (shape[:i] + shape[i + 1 :], spec[:i] + spec[i + 1 :], 4)
        return states + [drop(order[-1]), drop(order[-2]), placeholder]  # v_row, v_col, v
    return states + [placeholder, placeholder, (shape, spec, 4)]


def validate(cfg: ViTConfig, mesh: dict[str, int], batch_size: int) -> None:
    """ConfigError for a batch or model that does not split over the mesh."""
    dp, tp = mesh["data"] * mesh["fsdp"], mesh["tensor"]
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if batch_size % dp:
        raise ConfigError(
            f"batch size {batch_size} does not divide over data*fsdp = {mesh['data']}*{mesh['fsdp']} = {dp} devices",
            hint=f"use a multiple of {dp}, e.g. --batch-size {dp * max(1, round(batch_size / dp))}",
        )
    for what, size in (("num_heads", cfg.num_heads), ("mlp_dim", cfg.mlp_dim)):
        if size % tp:
            divisors = [d for d in range(1, min(size, 64) + 1) if size % d == 0 and cfg.num_heads % d == 0 and cfg.mlp_dim % d == 0]
            raise ConfigError(
                f"{what} {size} does not divide over tensor = {tp} devices",
                hint=f"tensor parallelism shards heads and the MLP: pick tensor from {', '.join(map(str, divisors))}",
            )


def activation_terms(cfg: ViTConfig, mesh: dict[str, int], batch_size: int, dtype: str, flash: bool = False) -> dict[str, int]:
    """Bytes per device that one block saves for its backward pass, by term (see module docstring).

    The terms are the residuals jax.grad keeps for vitctl's Block (as listed by jax's
    saved-residuals tool), so they follow the model's numerics: norms computed in
    float32, softmax exp at the softmax dtype, GELU's own intermediates. (The fused
    forward adds nothing: it accumulates the output projections, it concatenates no kernels.)
    """
    b = batch_size // (mesh["data"] * mesh["fsdp"])
    T, D, K = cfg.seq_len, cfg.width, cfg.head_dim
    n, f = cfg.num_heads // mesh["tensor"], cfg.mlp_dim // mesh["tensor"]
    a, s = BYTES[dtype], 4 if cfg.softmax_dtype == "float32" else BYTES[dtype]
    X, H, P, U = b * T * D, b * T * n * K, b * n * T * T, b * T * f
    norm = 2 * X * 4 + X * a  # the input upcast to float32, its normalised form, the output
    terms = {"norm: float32 input, normalised, output 3x(b,T,D)": norm}
    if cfg.qk_norm:
        terms["q, k in float32, normalised 4x(b,T,n,K) float32"] = 4 * H * 4
        terms["v, scaled q, k 3x(b,T,n,K)"] = 3 * H * a
    else:
        terms["q, k, v 3x(b,T,n,K)"] = 3 * H * a
    if flash:
        terms["softmax statistics (b,n,T) float32"] = b * n * T * 4
    else:
        terms["softmax exp and probabilities 2x(b,n,T,T)"] = P * s + P * a
    terms["attention output (b,T,n*K)"] = H * a
    gelu = 6 if cfg.gelu_approximate else 4  # tanh form: 6 saved intermediates; erf form: 4
    terms[f"MLP hidden and GELU intermediates {gelu}x(b,T,f)"] = gelu * U * a
    if cfg.block == "sequential":
        terms["second norm 3x(b,T,D)"] = norm
    return terms


def stem_head_activations(cfg: ViTConfig, mesh: dict[str, int], batch_size: int, dtype: str) -> int:
    """Saved activations outside the blocks (not rematerialised): images, final norm, MAP head, logits."""
    b = batch_size // (mesh["data"] * mesh["fsdp"])
    T, D, a = cfg.seq_len, cfg.width, BYTES[dtype]
    total = b * cfg.image_size**2 * cfg.channels * a + 2 * b * T * D * a
    if cfg.pool == "map":
        total += 2 * b * T * (cfg.num_heads // mesh["tensor"]) * cfg.head_dim * a
    return total + b * (cfg.num_classes or D) * 4


def _weights(cfg: ViTConfig, sizes: dict[str, int], pbytes: int, optimizer: str, momentum_dtype: str | None):
    """(parameter bytes, optimizer-state bytes, one gathered layer's weight bytes, indivisible parameters) per device."""
    params = opt = layer_weights = 0
    bad: list[dict[str, Any]] = []
    for pname, (shape, spec) in param_specs(cfg).items():
        params += math.prod(shard_shape(shape, spec, sizes)) * pbytes
        opt += sum(math.prod(shard_shape(s, sp, sizes)) * nb for s, sp, nb in optimizer_states(shape, spec, optimizer, momentum_dtype))
        bad += indivisible(pname, shape, spec, sizes)
        if is_stacked(pname):  # one layer, gathered over data/fsdp, still split over tensor
            tp_only = tuple(tuple(a for a in axes if a == "tensor") for axes in spec[1:])
            layer_weights += math.prod(shard_shape(shape[1:], tp_only, sizes)) * pbytes
    return params, opt, layer_weights, bad


def _activations(cfg: ViTConfig, sizes: dict[str, int], batch_size: int, dtype: str, flash: bool):
    """(per-layer terms, one layer's bytes, activation bytes without remat, with remat) per device."""
    terms = activation_terms(cfg, sizes, batch_size, dtype, flash)
    layer = sum(terms.values())
    carry = (batch_size // (sizes["data"] * sizes["fsdp"])) * cfg.seq_len * cfg.width * BYTES[dtype]  # (b,T,D)
    outside = stem_head_activations(cfg, sizes, batch_size, dtype)
    acts = cfg.depth * layer + outside
    acts_remat = cfg.depth * carry + layer + outside
    return terms, layer, acts, acts_remat


def plan(
    cfg: ViTConfig,
    mesh: str | dict[str, int],
    batch_size: int,
    *,
    hbm: int,
    optimizer: str = "adamw",
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: bool | None = None,
    flash: bool = False,
    momentum_dtype: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """The per-device memory plan as one JSON-ready dict (keys as `vitctl plan --json`).

    Args:
      cfg: the model; dtype and param_dtype default to the config's.
      mesh: "data=1,fsdp=256,tensor=4" or {"data": 1, "fsdp": 256, "tensor": 4}.
      batch_size: global batch B, split over data * fsdp.
      hbm: bytes of memory per device.
      remat: the mode the caller runs (default cfg.remat); both totals are always computed.
      flash: attention keeps only softmax statistics, not the (b,n,T,T) probabilities.
      momentum_dtype: adafactor only: keep a first moment in this dtype (default: none).
      name: the model's name, echoed as "model".
    """
    sizes = parse_mesh(mesh) if isinstance(mesh, str) else {**dict.fromkeys(MESH_AXES, 1), **mesh}
    dtype, param_dtype = dtype or cfg.dtype, param_dtype or cfg.param_dtype
    remat = cfg.remat if remat is None else remat
    validate(cfg, sizes, batch_size)
    pbytes = BYTES[param_dtype]

    params, opt, layer_weights, bad = _weights(cfg, sizes, pbytes, optimizer, momentum_dtype)
    opt += 4  # the step count (int32), replicated

    terms, layer, acts, acts_remat = _activations(cfg, sizes, batch_size, dtype, flash)
    workspace = 2 * layer_weights + layer
    fixed = 2 * params + opt + workspace
    total, total_remat = fixed + acts, fixed + acts_remat
    per_device = {"params": params, "grads": params, "optimizer": opt, "activations": acts, "activations_remat": acts_remat,
                  "workspace": workspace, "total": total, "total_remat": total_remat}  # fmt: skip
    return {
        "model": name, "mesh": sizes, "devices": math.prod(sizes.values()), "batch_size": batch_size,
        "per_device_batch": batch_size // (sizes["data"] * sizes["fsdp"]), "optimizer": optimizer, "dtype": dtype,
        "param_dtype": param_dtype, "flash_attention": flash, "remat": remat, "per_device": per_device,
        "activations_per_layer": terms, "hbm": hbm, "headroom": hbm - total, "headroom_remat": hbm - total_remat,
        "fits": total <= hbm, "fits_remat": total_remat <= hbm, "indivisible": bad,
    }  # fmt: skip
