"""The core guarantee: the JAX and PyTorch models compute the same function.

Random parameters -> the mapping table -> strict load -> logits and every named
intermediate agree to max-abs 1e-5 in fp32 (highest matmul precision, TF32 off: see
conftest). Each value of each architecture option appears at least once.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")

from tests.conftest import jax_model, random_params, tiny, torch_model
from tests.golden import CLASSIC
from vitctl.convert import mapping
from vitctl.model_torch.model import ViT as TorchViT

CASES = {
    "vit22b": {},  # the paper's combination: parallel, QK-norm, no QKV/norm bias, RMSNorm, MAP
    "classic": CLASSIC,  # big_vision's ViT
    "unfused": {"fused": False},
    "loop_remat": {"scan_layers": False, "remat": True},
    "gap_sincos": {"pool": "gap", "posemb": "sincos2d"},
    "none_nohead": {"pool": "none", "num_classes": 0},
    "no_biases_tanh": {"attn_out_bias": False, "mlp_bias": False, "qk_norm": False, "gelu_approximate": True},
    "layernorm_biases": {"norm": "layernorm", "norm_bias": True, "qkv_bias": True},
    "sequential_qknorm_map": {"block": "sequential", "pool": "map", "qk_norm": True},
    "rmsnorm_bias_tok": {"norm_bias": True, "pool": "tok", "posemb": "sincos2d"},
}
# The options of the public ViT families (timm, Hugging Face, CLIP, DINOv2), every combination:
# block x norm_pre x fc_norm x layer_scale x (class token with its own position | GAP | MAP).
POOLS = {"tok_class_posemb": {"pool": "tok", "class_posemb": True}, "gap": {"pool": "gap"}, "map": {"pool": "map"}}
FAMILY_CASES = {
    f"{block}-{pool}{'-norm_pre' * pre}{'-fc_norm' * fc}{'-layer_scale' * ls}": {
        "block": block, **POOLS[pool], "norm_pre": pre, "fc_norm": fc, "layer_scale": 0.1 * ls,
        **({"norm": "layernorm", "norm_bias": True, "qkv_bias": True} if block == "sequential" else {}),
    }
    for block in ("parallel", "sequential") for pool in POOLS for pre in (False, True) for fc in (False, True) for ls in (False, True)
}  # fmt: skip
CASES["hf_vit"] = {**CLASSIC, "class_posemb": True, "norm_eps": 1e-12, "gelu_approximate": False}
FP32_ATOL = 1e-5


def images(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)


def run_both(cfg, jm, tm, x):
    """Same images through both models: NHWC for JAX, NCHW for torch."""
    _, out_j = jm(jax.numpy.asarray(x))
    with torch.no_grad():
        _, out_t = tm(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert list(out_j) == list(out_t)
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    return {k: (f32(out_j[k]), out_t[k].float().numpy()) for k in out_j}


def max_abs(pairs):
    return {k: float(np.abs(a - b).max()) for k, (a, b) in pairs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_jax_to_torch_fp32(case):
    cfg = tiny(**CASES[case])
    params = random_params(cfg, seed=1)
    pairs = run_both(cfg, jax_model(cfg, params), torch_model(cfg, params), images(cfg))
    expected = ["patch_embed", "embed", *(f"block{i:02d}" for i in range(cfg.depth)), "encoded", "pre_logits", "logits"]
    assert list(pairs) == expected
    errs = max_abs(pairs)
    assert max(errs.values()) < FP32_ATOL, errs
    assert np.abs(pairs["logits"][0]).max() > 0.1  # a real signal, not zeros


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_public_family_options_fp32(case):
    """Every combination of the options timm, HF, CLIP and DINOv2 models need, on every intermediate."""
    cfg = tiny(**FAMILY_CASES[case])
    params = random_params(cfg, seed=2)
    pairs = run_both(cfg, jax_model(cfg, params), torch_model(cfg, params), images(cfg))
    errs = max_abs(pairs)
    assert max(errs.values()) < FP32_ATOL, errs
    assert np.abs(pairs["logits"][0]).max() > 0.1


@pytest.mark.parametrize("case", ["vit22b", "classic", "hf_vit"])
def test_torch_to_jax_fp32(case):
    """The other direction: the torch model's own init, perturbed -> JAX."""
    cfg = tiny(**CASES[case])
    torch.manual_seed(0)
    tm = TorchViT(cfg).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = mapping.torch_to_jax(state, cfg)
    errs = max_abs(run_both(cfg, jax_model(cfg, params), tm, images(cfg, seed=1)))
    assert max(errs.values()) < FP32_ATOL, errs


def test_scan_loop_fused_unfused_agree():
    """Forward options that must not change the function (same framework, same params)."""
    params = random_params(tiny(), seed=2)
    x = jax.numpy.asarray(images(tiny()))
    ref = np.asarray(jax_model(tiny(), params)(x)[0])
    for kw in ({"scan_layers": False}, {"fused": False}, {"remat": True}):
        np.testing.assert_allclose(np.asarray(jax_model(tiny(**kw), params)(x)[0]), ref, atol=2e-6, rtol=0, err_msg=str(kw))


# bf16 compute (params fp32, cast at use; norms and softmax in fp32). Measured on this
# CPU (tiny configs, batch 4): logits differ by up to 2.3e-2 max-abs between the
# frameworks, block outputs by up to 4.7e-2 (1-2 bf16 ulps at their scale of 2-8): each
# side rounds matmul outputs to bf16 at its own points. The preset keeps ~2.5x headroom.
BF16_ATOL_LOGITS = 6e-2
BF16_RTOL_ACTS = 4e-2  # max-abs diff / max-abs of the reference


@pytest.mark.parametrize("case", ["vit22b", "classic"])
@pytest.mark.parametrize("softmax", ["float32", "compute"])
def test_bf16_agreement(case, softmax):
    cfg = tiny(**CASES[case], dtype="bfloat16", softmax_dtype=softmax)
    params = random_params(cfg, seed=3)
    pairs = run_both(cfg, jax_model(cfg, params), torch_model(cfg, params), images(cfg, batch=4))
    errs = max_abs(pairs)
    print(case, softmax, {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["logits"] < BF16_ATOL_LOGITS, errs
    for k, (a, b) in pairs.items():
        assert np.abs(a - b).max() / np.abs(a).max() < BF16_RTOL_ACTS, (k, errs)
    # ...and bf16 is really in use: it differs from the fp32 function well above fp32 noise.
    fp32 = run_both(
        tiny(**CASES[case]), jax_model(tiny(**CASES[case]), params), torch_model(tiny(**CASES[case]), params), images(cfg, batch=4)
    )
    assert np.abs(fp32["logits"][0] - pairs["logits"][0]).max() > 1e-4
