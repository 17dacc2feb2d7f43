"""vitctl.open: one door to every checkpoint format, and the refusals it makes before reading data."""

import numpy as np
import pytest

from tests.conftest import random_params, tiny
from vitctl import checkpoint as ckpt
from vitctl import hub
from vitctl.convert.mapping import jax_to_torch, unstack
from vitctl.errors import CheckpointError, ConfigError
from vitctl.formats import layout
from vitctl.open import BIG_VISION, JAX, TIMM, TORCH, detect, open_checkpoint

CFG = tiny(depth=2)
BV_CFG = tiny(
    depth=2, block="sequential", qk_norm=False, qkv_bias=True, norm="layernorm", norm_bias=True, gelu_approximate=True, pool="tok"
)


def per_layer(cfg):
    return dict(unstack(random_params(cfg), cfg.depth))


def make_jax(path, cfg=CFG):
    pytest.importorskip("orbax.checkpoint")
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"created_by": "test"})
    layout.save_jax(path, random_params(cfg))
    return path


def make_torch(path, cfg=CFG, max_shard_bytes=None):
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"created_by": "test"})
    layout.save_torch(path, jax_to_torch(random_params(cfg), cfg), max_shard_bytes)
    return path


def make_npz(path, cfg=BV_CFG, prefix="params/img/"):
    big_vision = pytest.importorskip("vitctl.convert.big_vision")
    arrays = {prefix + big_vision.to_big_vision(n): w for n, w in per_layer(cfg).items()}
    np.savez(path, **arrays, **{"params/txt/x": np.zeros(3, np.float32)})
    return path


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        assert got[n].shape == w.shape and np.array_equal(np.asarray(got[n]), np.asarray(w)), n


def test_every_format_opens_to_the_same_parameters(tmp_path):
    want = per_layer(CFG)
    for path, fmt in ((make_jax(tmp_path / "jax"), JAX), (make_torch(tmp_path / "pt", max_shard_bytes=20_000), TORCH)):
        assert detect(path) == fmt
        with open_checkpoint(path) as c:
            assert (c.format, c.path, c.cfg) == (fmt, path, CFG)
            assert len(c.infos) == len(want) and c.backend == ("torch" if fmt == TORCH else "jax")
            assert c.provenance["created_by"] == "test" and c.files()[0] == path / layout.CONFIG
            assert_same(c.params(), want)


def test_timm_export_and_big_vision_npz(tmp_path):
    pytest.importorskip("vitctl.convert.timm")
    from vitctl.convert import convert as cv

    cv.convert(make_torch(tmp_path / "pt"), tmp_path / "timm", "torch-to-jax")
    cv.convert(tmp_path / "timm", tmp_path / "export", "jax-to-torch", target_format="timm")
    with open_checkpoint(tmp_path / "export") as c:
        assert c.format == TIMM and c.backend == "timm"
        assert_same(c.params(), per_layer(CFG))
    npz = make_npz(tmp_path / "vit.npz")
    assert detect(npz) == BIG_VISION
    with open_checkpoint(npz, prefix="params/img") as c:
        assert c.format == BIG_VISION and c.files() == [npz] and c.provenance == {}
        assert (c.cfg.width, c.cfg.depth, c.cfg.pool) == (BV_CFG.width, BV_CFG.depth, "tok") and c.notes
        assert_same(c.params(), per_layer(BV_CFG))


def test_hf_uri_is_fetched_through_the_hub(tmp_path, monkeypatch):
    local = make_torch(tmp_path / "snapshot")
    calls = []

    def resolve(where, backend="all", must_exist=False):
        calls.append((str(where), backend))
        return local

    monkeypatch.setattr(hub, "resolve_checkpoint", resolve)
    with open_checkpoint("hf://org/name@main", fetch="torch") as c:
        assert c.path == local and c.format == TORCH
    assert calls == [("hf://org/name@main", "torch")]


def test_refusals_before_any_data(tmp_path):
    with pytest.raises(ConfigError, match="A: no such file or directory"):
        open_checkpoint(tmp_path / "absent", label="A")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not an .npz"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weights"):
        open_checkpoint(tmp_path / "empty")
    torch_dir = make_torch(tmp_path / "pt")
    with pytest.raises(ConfigError, match="--prefix applies to big_vision"):
        open_checkpoint(torch_dir, prefix="params/img")
    with pytest.raises(CheckpointError, match="holds no vitctl-jax weights \\(found: vitctl-torch\\)") as e:
        detect(torch_dir, (JAX,), other_hint="the other way")
    assert e.value.hint == "the other way"
    ckpt.write_config(torch_dir, CFG, {"created_by": "test", "target_format": TIMM})  # a timm export, by its provenance
    assert detect(torch_dir) == TIMM
    with pytest.raises(CheckpointError, match="is a timm export"):
        detect(torch_dir, (TORCH,), doing="convert torch-to-jax")
