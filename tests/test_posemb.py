"""resample_posemb against the resamplers it follows: jax.image.resize (big_vision's bilinear)
and timm's resample_abs_pos_embed (torch bicubic, align_corners=False, antialias=False)."""

import numpy as np
import pytest

from vitctl.posemb import resample_posemb

GRIDS = [((4, 4), (7, 7)), ((6, 6), (3, 3)), ((4, 4), (4, 6)), ((5, 5), (8, 8))]


def _posemb(side_h, side_w, prefix=0, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(1, prefix + side_h * side_w, d)).astype(np.float32)


@pytest.mark.parametrize(("old", "new"), GRIDS)
def test_bilinear_is_jax_image_resize(old, new):
    jax = pytest.importorskip("jax")
    pe = _posemb(*old)
    want = np.asarray(jax.image.resize(pe[0].reshape(*old, -1), (*new, pe.shape[-1]), method="bilinear")).reshape(1, -1, pe.shape[-1])
    got = resample_posemb(pe, new, old)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)  # jax computes in float32, this in float64


@pytest.mark.parametrize(("old", "new"), GRIDS)
def test_bicubic_is_timm_resample_abs_pos_embed(old, new):
    torch = pytest.importorskip("torch")
    pos_embed = pytest.importorskip("timm.layers.pos_embed")
    pe = _posemb(*old, prefix=1)
    want = pos_embed.resample_abs_pos_embed(torch.from_numpy(pe), list(new), list(old), num_prefix_tokens=1, antialias=False).numpy()
    got = resample_posemb(pe, new, old, prefix=1, method="bicubic")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_class_slot_kept_and_same_grid_unchanged():
    pe = _posemb(4, 4, prefix=1)
    assert resample_posemb(pe, (4, 4), prefix=1) is pe
    out = resample_posemb(pe, (6, 6), prefix=1)
    assert out.shape == (1, 37, 6) and np.array_equal(out[:, 0], pe[:, 0])
    with pytest.raises(ValueError, match="Unknown"):
        resample_posemb(pe, (6, 6), prefix=1, method="nearest")
