"""The PyTorch model: shapes, the 22B model on the meta device, golden logits."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import tiny, torch_model
from tests.golden import CASES, golden_case
from vitctl.config import ViTConfig
from vitctl.model_torch.model import Norm, ViT, abstract_model
from vitctl.params import param_counts, torch_param_shapes


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"block": "sequential", "pool": "tok", "qkv_bias": True, "norm_bias": True},
        {"pool": "gap", "posemb": "sincos2d", "num_classes": 0},
        {
            "block": "sequential",
            "pool": "tok",
            "class_posemb": True,
            "norm_pre": True,
            "fc_norm": True,
            "layer_scale": 1e-5,
            "norm_bias": True,
        },
    ],
)
def test_shapes_match_the_table(kw):
    cfg = tiny(**kw)
    got = {k: tuple(v.shape) for k, v in ViT(cfg).state_dict().items()}
    assert got == torch_param_shapes(cfg)


def test_vit22b_on_meta_device():
    cfg = ViTConfig.from_variant("vit-22b")
    model = abstract_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["params_total"]


@pytest.mark.parametrize("name", list(CASES))
def test_golden_logits(name):
    cfg, params, x, expected = golden_case(name)
    with torch.no_grad():
        logits, _ = torch_model(cfg, params)(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(logits.numpy()[:, :5], expected, atol=1e-5, rtol=0)


def test_bf16_compute_with_fp32_params():
    cfg = tiny(dtype="bfloat16")
    model = ViT(cfg).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        logits, out = model(torch.zeros(1, 3, 16, 16))
    assert logits.dtype == torch.bfloat16 and out["block01"].dtype == torch.bfloat16


@pytest.mark.parametrize("kw", [{}, {"block": "sequential", "pool": "tok", "qkv_bias": True, "mlp_bias": True, "attn_out_bias": True}])
def test_bf16_gemms_in_fp32_match_bf16_gemms(kw, monkeypatch):
    """Without bf16 units the GEMMs multiply the bf16 values in fp32 and round once; that is what
    torch's own bf16 GEMM (fp32 accumulation) computes, up to accumulation order: the same
    output within a few bf16 ulps, with every GEMM input rounded to bf16 exactly as before."""
    from vitctl.model_torch import cpu_bf16 as m

    cfg = tiny(dtype="bfloat16", head_zero_init=False, **kw)
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    x = torch.randn(4, 3, 16, 16).bfloat16()
    outs = {}
    for native in (True, False):
        monkeypatch.setattr(m, "CPU_BF16", native)
        assert m.gemm_in_fp32(x) is (not native)
        with torch.no_grad():
            outs[native] = model(x)
    for name, a in outs[True][1].items():
        b = outs[False][1][name]
        assert b.dtype == torch.bfloat16
        scale = a.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2**-6 * scale, name  # 2 bf16 ulps of the tensor's scale


@pytest.mark.parametrize("kw", [{}, {"block": "sequential", "pool": "tok", "qkv_bias": True, "norm": "layernorm", "norm_bias": True}])
def test_backward(kw):
    """The fused forward accumulates projections in place (addmm_): autograd must see it."""
    cfg = tiny(head_zero_init=False, **kw)
    torch.manual_seed(0)
    model = ViT(cfg)
    x = torch.randn(2, 3, 16, 16)
    model(x)[0].square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # The same gradients as the plain forward (fused=False: one `x + dense(a)` per branch).
    plain = ViT(dataclasses.replace(cfg, fused=False))
    plain.load_state_dict(model.state_dict())
    plain(x)[0].square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_matches_its_formula(norm, dtype):
    """Norm runs torch's fused kernels; they must compute PARITY.md's centered formula
    (float32 inside, output in the input dtype), checked against float64."""
    cfg = tiny(norm=norm, norm_bias=True, norm_eps=1e-3)
    m = Norm(cfg, 40)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = (torch.randn(3, 5, 40) * 4 + 2).to(dtype)
    y = x.double()
    if norm == "layernorm":
        y = y - y.mean(-1, keepdim=True)
    y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + 1e-3) * m.weight.double() + m.bias.double()
    got = m(x)
    assert got.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 8e-3 * y.abs().max().item()
    torch.testing.assert_close(got.double(), y.to(dtype).double() if dtype != torch.float32 else y, atol=tol, rtol=0)


# Checkpoints on disk, the mapping table, timm export and big_vision import depend on these:
# every state_dict key in order, with shape and dtype, plus the buffers (sha256 of the listing).
PINNED = {
    "vit22b": ({}, "369e78201759f737"),
    "classic": (
        {"block": "sequential", "qk_norm": False, "qkv_bias": True, "norm": "layernorm", "norm_bias": True, "pool": "tok"},
        "45a5957c8524a253",
    ),
    "gap_sincos_nohead": (
        {"pool": "gap", "posemb": "sincos2d", "num_classes": 0, "attn_out_bias": False, "mlp_bias": False},
        "4db74532f57c40d8",
    ),
    "bf16": ({"param_dtype": "bfloat16", "dtype": "bfloat16", "qkv_bias": True, "norm_bias": True}, "6ee7983b9483b9b9"),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_state_dict_is_pinned(name):
    import hashlib

    kw, digest = PINNED[name]
    model = abstract_model(tiny(**kw))
    listing = [f"{k} {tuple(v.shape)} {v.dtype}" for k, v in model.state_dict().items()]
    listing += [f"buffer {k} {tuple(v.shape)}" for k, v in model.named_buffers()]
    assert hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16] == digest, "\n".join(listing)
