"""The PyTorch model: shapes, the 22B model on the meta device, golden logits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import tiny, torch_model  # noqa: E402
from tests.golden import CASES, golden_case  # noqa: E402
from vitctl.config import ViTConfig  # noqa: E402
from vitctl.convert import mapping  # noqa: E402
from vitctl.model_torch.model import ViT  # noqa: E402


@pytest.mark.parametrize("kw", [{}, dict(block="sequential", pool="tok", qkv_bias=True, norm_bias=True), dict(pool="gap", posemb="sincos2d", num_classes=0)])
def test_shapes_match_the_table(kw):
    cfg = tiny(**kw)
    got = {k: tuple(v.shape) for k, v in ViT(cfg).state_dict().items()}
    assert got == mapping.torch_param_shapes(cfg)


def test_vit22b_on_meta_device():
    cfg = ViTConfig.from_variant("vit-22b")
    with torch.device("meta"):
        model = ViT(cfg)
    assert sum(p.numel() for p in model.parameters()) == mapping.param_counts(cfg)["params_total"]


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


def test_backward():
    model = ViT(tiny(head_zero_init=False))
    logits, _ = model(torch.randn(2, 3, 16, 16))
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
