"""vitctl.formats.layout: the checkpoint directory's round trips, bf16, bounded Orbax chunks, formats detected from content."""

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import tiny
from tests.formats.orbax_testing import orbax_restore, zarr_metadata
from tests.test_checkpoint import DTYPES, assert_same, random_params
from vitctl import checkpoint as ckpt
from vitctl.convert.mapping import jax_to_torch
from vitctl.errors import CheckpointError, UnmappedParamError
from vitctl.formats import layout


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_jax_round_trip(tmp_path, param_dtype):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny(param_dtype=param_dtype)
    flat = random_params(cfg)
    ckpt.write_config(tmp_path, cfg, {"created_by": "test"})
    layout.save_jax(tmp_path, flat)
    assert layout.detect_formats(tmp_path) == [layout.JAX]
    assert layout.read_checkpoint_config(tmp_path) == cfg
    assert_same(layout.load_jax(tmp_path, cfg), flat)
    assert_same(orbax_restore(tmp_path, cfg), flat)  # a real Orbax checkpoint


def test_jax_round_trip_from_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    cfg = tiny(param_dtype="bfloat16")
    flat = random_params(cfg, seed=1)
    layout.save_jax(tmp_path, {n: jnp.asarray(a) for n, a in flat.items()})  # as model_jax.flat_params returns
    assert_same(layout.load_jax(tmp_path, cfg), flat)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_torch_round_trip(tmp_path, param_dtype):
    cfg = tiny(param_dtype=param_dtype)
    state = jax_to_torch(random_params(cfg), cfg)  # transposed views: must be written contiguous
    layout.save_torch(tmp_path, state)
    assert layout.detect_formats(tmp_path) == [layout.TORCH]
    got = layout.load_torch(tmp_path, cfg)
    assert_same(got, state)
    assert all(a.dtype == DTYPES[param_dtype] for a in got.values())


def test_torch_file_is_what_torch_expects(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vitctl.model_torch.model import ViT

    for param_dtype in ("float32", "bfloat16"):
        cfg = tiny(param_dtype=param_dtype)
        state = jax_to_torch(random_params(cfg), cfg)
        d = tmp_path / param_dtype
        d.mkdir()
        layout.save_torch(d, state)
        with safe_open(str(d / layout.SAFETENSORS), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        tensors = load_file(d / layout.SAFETENSORS)
        assert tensors["head.weight"].dtype == getattr(torch, param_dtype)
        for n, a in state.items():
            t = tensors[n].view(torch.uint16) if param_dtype == "bfloat16" else tensors[n]
            np.testing.assert_array_equal(t.numpy(), np.ascontiguousarray(a).view(t.numpy().dtype), err_msg=n)
        ViT(cfg).load_state_dict(tensors, strict=True)


def test_chunks_are_bounded(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    flat = random_params(cfg)
    layout.save_jax(tmp_path, flat, chunk_bytes=1024)
    meta = zarr_metadata(tmp_path / layout.PARAMS)
    assert sorted(meta) == sorted(n.replace("/", ".") for n in flat)
    split = 0
    for n, a in flat.items():
        m = meta[n.replace("/", ".")]
        assert tuple(m["shape"]) == a.shape
        assert np.prod(m["chunks"]) * a.itemsize <= 1024, (n, m["chunks"])
        if n.startswith("blocks/"):
            assert m["chunks"][0] == 1, (n, m["chunks"])  # each chunk inside one layer
        split += tuple(m["chunks"]) != a.shape
    assert split >= len(flat) // 2  # the bound really cut arrays, not just passed through
    assert_same(layout.load_jax(tmp_path, cfg), flat)


def test_default_chunks_split_layers(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    flat = random_params(cfg)
    layout.save_jax(tmp_path, flat)
    meta = zarr_metadata(tmp_path / layout.PARAMS)
    for n, a in flat.items():
        chunks = tuple(meta[n.replace("/", ".")]["chunks"])
        # Small arrays fit in one CHUNK_BYTES chunk; stacked blocks still get one chunk per layer.
        assert chunks == ((1, *a.shape[1:]) if n.startswith("blocks/") else a.shape), n


def test_load_jax_checks_names_and_shapes(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    layout.save_jax(tmp_path, random_params(cfg))
    with pytest.raises(UnmappedParamError, match="blocks/q/kernel.*has shape") as e:
        layout.load_jax(tmp_path, tiny(num_heads=4))  # K 12 instead of 16
    assert e.value.hint
    with pytest.raises(UnmappedParamError, match="unexpected 2: head/bias, head/kernel"):
        layout.load_jax(tmp_path, tiny(num_classes=0))


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no JAX weights"):
        layout.load_jax(tmp_path, tiny())
    with pytest.raises(CheckpointError, match="no torch weights"):
        layout.load_torch(tmp_path)
    with pytest.raises(CheckpointError, match="holds no weights") as e:
        layout.detect_format(tmp_path)
    assert "vitctl init" in e.value.hint
    (tmp_path / layout.SAFETENSORS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="cannot read"):
        layout.load_torch(tmp_path)


def test_detect_format_prefers(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    flat = random_params(cfg)
    layout.save_jax(tmp_path, flat)
    layout.save_torch(tmp_path, jax_to_torch(flat, cfg))
    assert layout.detect_formats(tmp_path) == [layout.JAX, layout.TORCH]
    assert layout.detect_format(tmp_path) == layout.JAX
    assert layout.detect_format(tmp_path, prefer=layout.TORCH) == layout.TORCH


def test_missing_config_names_init(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as e:
        layout.read_checkpoint_config(tmp_path)
    assert "vitctl init" in e.value.hint


def test_timm_export_is_its_own_format(tmp_path):
    """Safetensors beside timm's hub config (architecture + model_args) are "timm", not vitctl-torch;
    reading them as vitctl weights is refused by name."""
    layout.save_torch(tmp_path, {"head.weight": np.zeros((2, 2), np.float32)})
    ckpt.write_config(tmp_path, tiny(), {}, head={"architecture": "vit_base_patch16_224", "model_args": {"depth": 2}})
    assert layout.detect_formats(tmp_path) == ["timm"] and layout.detect_format(tmp_path) == "timm"
    with pytest.raises(CheckpointError, match="is a timm export \\(written by --format timm\\)") as e:
        layout.load_torch(tmp_path, tiny())
    assert "vitctl-torch or vitctl-jax checkpoint it came from" in e.value.hint and "local-dir:" in e.value.hint
    ckpt.write_config(tmp_path, tiny(), {})
    assert layout.detect_formats(tmp_path) == ["vitctl-torch"]


def test_load_jax_casts_to_the_configs_dtype_as_orbax_does(tmp_path):
    """Stored float32, read as bfloat16 (and back): the same rounding as Orbax's restore into a bf16 target."""
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny()
    layout.save_jax(tmp_path, random_params(cfg))
    bf16 = tiny(param_dtype="bfloat16")
    got = layout.load_jax(tmp_path, bf16)
    assert all(a.dtype == ml_dtypes.bfloat16 for a in got.values())
    assert_same(got, orbax_restore(tmp_path, bf16))
    (tmp_path / "bf16").mkdir()
    layout.save_jax(tmp_path / "bf16", got)
    assert_same(layout.load_jax(tmp_path / "bf16", cfg), orbax_restore(tmp_path / "bf16", cfg))


def test_load_jax_needs_no_jax(tmp_path):
    cfg = tiny(depth=2)
    layout.save_jax(tmp_path, random_params(cfg))
    code = (
        "import sys; from vitctl.formats import layout; from tests.conftest import tiny; "
        f"flat = layout.load_jax({str(tmp_path)!r}, tiny(depth=2)); "
        "print(len(flat), sorted(m for m in ('jax', 'torch', 'orbax', 'flax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert out == [str(len(random_params(cfg))), "[]\n"]
