"""The streaming driver: every format pair, exact round trips, casts, and every bad input.

Sources are written by the real libraries (Orbax via layout.save_jax, safetensors
via layout.save_torch / safetensors.numpy); results are read back by them too.
After a failure DST is absent, no temporary sibling is left, and SRC is byte-identical.
Signals and a full disk are tested in a subprocess in tests/cli/test_convert_cli.py.
"""

import dataclasses
import hashlib
import json
import shutil

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import random_params, tiny
from tests.formats.orbax_testing import orbax_restore, zarr_metadata
from vitctl import checkpoint as ckpt
from vitctl.convert import convert as cv
from vitctl.convert.mapping import jax_param_shapes, jax_to_torch, unstack
from vitctl.errors import CheckpointError, ConfigError, OutputExistsError, UnmappedParamError
from vitctl.formats import layout
from vitctl.formats.orbax import OrbaxReader
from vitctl.formats.safetensors import INDEX, SafetensorsReader, read_safetensors_header, shard_names

BF16 = np.dtype(ml_dtypes.bfloat16)
CFG = tiny(depth=3)


def params(cfg=CFG, seed=0):
    return {n: a.astype(np.dtype(cfg.param_dtype) if cfg.param_dtype == "float32" else BF16) for n, a in random_params(cfg, seed).items()}


def make_jax(path, cfg=CFG, flat=None):
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"source_format": "init", "created_by": "test"})
    layout.save_jax(path, params(cfg) if flat is None else flat)
    return path


def make_torch(path, cfg=CFG, state=None, max_shard_bytes=None):
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"source_format": "init", "created_by": "test"})
    layout.save_torch(path, jax_to_torch(params(cfg), cfg) if state is None else state, max_shard_bytes)
    return path


def tree_hash(path):
    """Names and bytes of every file under path (or of the file)."""
    h = hashlib.sha256()
    for p in sorted([path, *path.rglob("*")]) if path.is_dir() else [path]:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        assert got[n].tobytes() == np.ascontiguousarray(want[n]).tobytes(), n


def assert_nothing_written(dst):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "a temporary sibling was left behind"


@pytest.fixture(scope="module")
def jax_src(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    return make_jax(tmp_path_factory.mktemp("src") / "jax")


@pytest.fixture(scope="module")
def torch_src(tmp_path_factory):
    return make_torch(tmp_path_factory.mktemp("src") / "torch")


# Every format pair, exactly.
def test_jax_to_torch_is_the_mapping_table(jax_src, tmp_path):
    dst = tmp_path / "pt"
    before = tree_hash(jax_src)
    result = cv.convert(jax_src, dst, "jax-to-torch")
    assert tree_hash(jax_src) == before
    assert layout.detect_formats(dst) == [layout.TORCH] and sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert_bitwise(layout.load_torch(dst, CFG), {n: np.ascontiguousarray(a) for n, a in jax_to_torch(params(), CFG).items()})
    assert result["tensors"] == len(jax_param_shapes(CFG, stacked=False)) and result["shards"] == 1
    assert result["bytes"] == sum(a.nbytes for a in params().values()) and result["peak_rss_bytes"] > 0
    r = SafetensorsReader(dst)
    assert r.metadata == {"format": "pt", "source_format": "vitctl-jax", "source_dtype": "float32", "vitctl_version": "0.1.0"}
    r.close()
    prov = layout.read_provenance(dst)
    assert (
        prov["source_format"] == "vitctl-jax"
        and prov["source"] == jax_src.name  # a local path is stored as its final name (checkpoint.public_provenance)
        and prov["created_by"] == "vitctl convert jax-to-torch"
    )
    assert prov["source_provenance"]["created_by"] == "test"
    assert layout.read_checkpoint_config(dst) == CFG


def test_converted_torch_checkpoint_loads_strictly(jax_src, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from vitctl.model_torch.model import ViT

    cv.convert(jax_src, tmp_path / "pt", "jax-to-torch", max_shard_size="30KB")
    state = {}
    for shard in json.loads((tmp_path / "pt" / INDEX).read_text())["weight_map"].values():
        state.update(load_file(tmp_path / "pt" / shard))
    result = ViT(CFG).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert state["head.weight"].dtype == torch.float32


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_identical(tmp_path, param_dtype):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny(depth=3, param_dtype=param_dtype)
    flat = params(cfg, seed=1)
    src = make_jax(tmp_path / "jax", cfg, flat)
    cv.convert(src, tmp_path / "pt", "jax-to-torch", max_shard_size="20KB")  # sharded on the way
    cv.convert(tmp_path / "pt", tmp_path / "jax2", "torch-to-jax")
    cv.convert(tmp_path / "jax2", tmp_path / "pt2", "jax-to-torch", max_shard_size="20KB")
    assert_bitwise(orbax_restore(tmp_path / "jax2", cfg), flat)  # restored by Orbax itself
    assert_bitwise(layout.load_jax(tmp_path / "jax2", cfg), flat)  # and by vitctl's reader
    assert {m["compressor"] for m in zarr_metadata(tmp_path / "jax2" / "params").values()} == {None}  # stored uncompressed
    assert not (tmp_path / "jax2" / "params" / "manifest.ocdbt").exists()  # one directory per array, read without tensorstore:
    assert sorted(OrbaxReader(tmp_path / "jax2" / "params")._plain) == sorted(flat)
    cv.convert(tmp_path / "pt", tmp_path / "jax3", "torch-to-jax", compress=True)  # zstd level 1, as Orbax writes
    assert all(m["compressor"] == {"id": "zstd", "level": 1} for m in zarr_metadata(tmp_path / "jax3" / "params").values())
    assert_bitwise(orbax_restore(tmp_path / "jax3", cfg), flat)
    assert_bitwise(layout.load_jax(tmp_path / "jax3", cfg), flat)
    for f in (tmp_path / "pt").iterdir():
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (tmp_path / "pt2" / f.name).read_bytes(), f.name
    assert layout.read_checkpoint_config(tmp_path / "jax2") == cfg


def test_torch_to_jax_from_the_safetensors_library(tmp_path):
    """A torch checkpoint written by safetensors itself (not by vitctl) converts exactly."""
    pytest.importorskip("orbax.checkpoint")
    from safetensors.numpy import save_file

    src = tmp_path / "pt"
    src.mkdir()
    ckpt.write_config(src, CFG, {})
    save_file({n: np.ascontiguousarray(a) for n, a in jax_to_torch(params(), CFG).items()}, str(src / "model.safetensors"))
    cv.convert(src, tmp_path / "jax", "torch-to-jax")
    assert_bitwise(layout.load_jax(tmp_path / "jax", CFG), params())


def test_sharded_torch_source(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    src = make_torch(tmp_path / "pt", max_shard_bytes=25_000)
    assert (src / INDEX).is_file() and layout.detect_formats(src) == [layout.TORCH]
    assert_bitwise(layout.load_torch(src, CFG), {n: np.ascontiguousarray(a) for n, a in jax_to_torch(params(), CFG).items()})
    cv.convert(src, tmp_path / "jax", "torch-to-jax")
    assert_bitwise(layout.load_jax(tmp_path / "jax", CFG), params())


def test_max_shard_size_gives_hf_shards(jax_src, tmp_path):
    result = cv.convert(jax_src, tmp_path / "pt", "jax-to-torch", max_shard_size="40KB")
    names = sorted(p.name for p in (tmp_path / "pt").iterdir())
    n = result["shards"]
    assert n > 2 and names == sorted(["config.json", INDEX, *shard_names(n)])
    for shard in shard_names(n):
        _, tensors = read_safetensors_header(tmp_path / "pt" / shard)
        assert sum(i.nbytes for i, _ in tensors.values()) <= 40_000 or len(tensors) == 1


# dtype.
SPECIAL = np.array(
    [
        0.0,
        -0.0,
        1 + 2**-8,
        1 + 3 * 2**-8,
        -(1 + 2**-8),
        1e-40,
        -1e-45,
        3.3e38,
        3.4e38,
        np.finfo(np.float32).max,
        np.inf,
        -np.inf,
        np.nan,
        2**-126,
        1 / 3,
    ],
    dtype=np.float32,
)  # ties to even both ways, subnormals, overflow to inf, infinities, NaN


def test_float32_to_bfloat16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state = {n: np.ascontiguousarray(a) for n, a in jax_to_torch(params(), CFG).items()}
    state["head.weight"].reshape(-1)[: SPECIAL.size] = SPECIAL
    src = make_torch(tmp_path / "pt", state=state)
    cv.convert(src, tmp_path / "jax16", "torch-to-jax", dtype="bfloat16")
    cv.convert(tmp_path / "jax16", tmp_path / "pt16", "jax-to-torch")
    got = layout.load_torch(tmp_path / "pt16")
    for n, a in state.items():
        want = torch.from_numpy(a).to(torch.bfloat16).view(torch.uint16).numpy()
        bits = got[n].view(np.uint16)
        nan = np.isnan(a)
        assert got[n].dtype == BF16 and np.array_equal(bits[~nan], want[~nan]), n
        assert np.isnan(got[n][nan].astype(np.float32)).all(), n  # NaN stays NaN (torch's CPU cast writes 0xFFFF, we the quiet NaN)
    assert layout.read_checkpoint_config(tmp_path / "jax16").param_dtype == "bfloat16"
    assert layout.read_provenance(tmp_path / "jax16")["dtype"] == "bfloat16"
    r = SafetensorsReader(tmp_path / "pt16")
    assert r.metadata["source_dtype"] == "bfloat16"
    r.close()


def test_bfloat16_to_float32_is_exact(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    cfg = tiny(depth=3, param_dtype="bfloat16")
    src = make_jax(tmp_path / "jax", cfg, params(cfg))
    result = cv.convert(src, tmp_path / "pt", "jax-to-torch", dtype="float32")
    assert result["output_dtypes"] == ["float32"] and result["bytes"] == 2 * result["source_bytes"]
    want = {n: np.ascontiguousarray(a).astype(np.float32) for n, a in jax_to_torch(params(cfg), cfg).items()}
    assert_bitwise(layout.load_torch(tmp_path / "pt"), want)
    assert layout.read_checkpoint_config(tmp_path / "pt").param_dtype == "float32"


# Dry run and plan.
def test_dry_run_plans_and_writes_nothing(jax_src, tmp_path):
    dst = tmp_path / "pt"
    p = cv.plan(jax_src, dst, "jax-to-torch", max_shard_size="40KB", dtype="bfloat16")
    p.source.close()
    s = p.summary()
    assert_nothing_written(dst)
    assert s["tensors"] == len(jax_param_shapes(CFG, stacked=False)) and s["bytes"] * 2 == s["source_bytes"]
    assert s["shards"] == len(s["files"]) - 2 and s["files"][:2] == ["config.json", f"model-00001-of-{s['shards']:05d}.safetensors"]
    largest = max(np.prod(v) * 4 for v in jax_param_shapes(CFG, stacked=False).values())
    assert s["estimated_peak_bytes"] >= cv._current_peak_rss() + cv.BASE_HEADROOM_BYTES + 7 * largest
    assert s["output_dtypes"] == ["bfloat16"] and p.cfg.param_dtype == "bfloat16"


# Bad input: nothing lost.
def edited_state(edit):
    state = {n: np.ascontiguousarray(a) for n, a in jax_to_torch(params(), CFG).items()}
    edit(state)
    return state


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.pop("blocks.1.q.weight"), "missing 1: blocks.1.q.weight"),
        (lambda s: s.update({"blocks.1.extra.weight": np.zeros(3, np.float32)}), "unexpected 1: blocks.1.extra.weight"),
        (lambda s: s.update({"blocks.3.q.weight": s["blocks.0.q.weight"]}), "unexpected 1: blocks.3.q.weight"),  # a layer beyond depth
        (lambda s: s.update({"head.bias": np.zeros(11, np.float32)}), r"'head.bias' has shape \(11,\), expected \(10,\)"),
    ],
)
def test_unaccounted_tensors_are_refused_before_writing(tmp_path, edit, match):
    src = make_torch(tmp_path / "pt", state=edited_state(edit))
    before, dst = tree_hash(src), tmp_path / "jax"
    with pytest.raises(UnmappedParamError, match=match) as e:
        cv.convert(src, dst, "torch-to-jax")
    assert str(src) in str(e.value) and "config.json" in e.value.hint and e.value.exit_code == 1
    assert_nothing_written(dst)
    assert tree_hash(src) == before


def test_config_contradicting_the_weights(jax_src, tmp_path):
    src = tmp_path / "jax"
    shutil.copytree(jax_src, src)
    ckpt.write_config(src, dataclasses.replace(CFG, num_heads=4, depth=2), {})  # K 12 instead of 16, one layer fewer
    with pytest.raises(
        UnmappedParamError, match=r"unexpected \d+: blocks/2/.*'blocks/0/q/kernel' has shape \(48, 3, 16\), expected \(48, 4, 12\)"
    ):
        cv.convert(src, tmp_path / "pt", "jax-to-torch")
    assert_nothing_written(tmp_path / "pt")
    with pytest.raises(UnmappedParamError, match="has shape"):  # the same through --model
        cv.convert(jax_src, tmp_path / "pt", "jax-to-torch", model=dataclasses.replace(CFG, mlp_dim=64))
    assert_nothing_written(tmp_path / "pt")


def test_truncated_safetensors_fails_before_writing(tmp_path):
    src = make_torch(tmp_path / "pt")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-16])
    before = tree_hash(src)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' ends at byte \d+, past the end of the file"):
        cv.convert(src, tmp_path / "jax", "torch-to-jax")
    assert_nothing_written(tmp_path / "jax")
    assert tree_hash(src) == before


def test_corrupt_orbax_data_fails_midway_and_leaves_nothing(jax_src, tmp_path):
    src = tmp_path / "jax"
    shutil.copytree(jax_src, src)
    for f in src.rglob("*"):
        if f.is_file() and f.parent.name == "d" and f.stat().st_size > 10_000:  # array data, not the tree nodes
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    before = tree_hash(src)
    with pytest.raises(CheckpointError, match=f"cannot read tensor '.*' from {src.absolute()}/params"):
        cv.convert(src, tmp_path / "pt", "jax-to-torch")
    assert_nothing_written(tmp_path / "pt")
    assert tree_hash(src) == before


def test_corrupt_orbax_metadata(jax_src, tmp_path):
    src = tmp_path / "jax"
    shutil.copytree(jax_src, src)
    (src / "params" / "_METADATA").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read .*params/_METADATA"):
        cv.convert(src, tmp_path / "pt", "jax-to-torch")
    assert_nothing_written(tmp_path / "pt")


def test_existing_dst_needs_force(jax_src, tmp_path):
    dst = tmp_path / "pt"
    cv.convert(jax_src, dst, "jax-to-torch")
    with pytest.raises(OutputExistsError, match="already exists") as e:
        cv.convert(jax_src, dst, "jax-to-torch", dtype="bfloat16")
    assert e.value.exit_code == 2 and layout.read_checkpoint_config(dst).param_dtype == "float32"
    cv.convert(jax_src, dst, "jax-to-torch", dtype="bfloat16", force=True)
    assert layout.read_checkpoint_config(dst).param_dtype == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt"]


def test_dst_overlapping_src_is_refused(jax_src):
    for dst in (jax_src, jax_src / "pt", jax_src.parent):
        with pytest.raises(ConfigError, match="overlaps SRC"):
            cv.convert(jax_src, dst, "jax-to-torch", force=True)


def test_wrong_direction_or_missing_weights(jax_src, torch_src, tmp_path):
    with pytest.raises(CheckpointError, match="holds no vitctl-torch weights \\(found: vitctl-jax\\)") as e:
        cv.convert(jax_src, tmp_path / "x", "torch-to-jax")
    assert "jax-to-torch" in e.value.hint
    with pytest.raises(CheckpointError, match="holds no vitctl-jax"):
        cv.convert(torch_src, tmp_path / "x", "jax-to-torch")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        cv.convert(tmp_path / "absent", tmp_path / "x", "jax-to-torch")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not an .npz"):
        cv.convert(tmp_path / "notes.txt", tmp_path / "x", "jax-to-torch")
    with pytest.raises(ConfigError, match="--from vitctl-torch cannot be converted by jax-to-torch"):
        cv.convert(torch_src, tmp_path / "x", "jax-to-torch", source_format="vitctl-torch")
    with pytest.raises(ConfigError, match="--format timm is not available for torch-to-jax"):
        cv.convert(torch_src, tmp_path / "x", "torch-to-jax", target_format="timm")
    assert_nothing_written(tmp_path / "x")


def test_missing_config_json(torch_src, tmp_path):
    src = tmp_path / "pt"
    shutil.copytree(torch_src, src)
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        cv.convert(src, tmp_path / "jax", "torch-to-jax")
    cv.convert(src, tmp_path / "jax", "torch-to-jax", model=CFG)  # --model supplies it
    assert layout.read_checkpoint_config(tmp_path / "jax") == CFG


# The colleagues' formats, through the same driver.
BV_CFG = tiny(
    depth=3, block="sequential", qk_norm=False, qkv_bias=True, norm="layernorm", norm_bias=True, gelu_approximate=True, pool="tok"
)


def write_npz(path, flat, cfg, scanned=False):
    big_vision = pytest.importorskip("vitctl.convert.big_vision")
    arrays = {}
    per_layer = dict(unstack(flat, cfg.depth))
    for name, w in per_layer.items():
        key = big_vision.to_big_vision(name)
        if scanned and key.startswith("Transformer/encoderblock_"):
            key = "Transformer/encoderblock/" + key.split("/", 2)[2]
            if key in arrays:
                continue
            w = (
                np.stack([per_layer[name.replace("blocks/0/", f"blocks/{i}/", 1)] for i in range(cfg.depth)])
                if name.startswith("blocks/0/")
                else None
            )
            if w is None:
                continue
        arrays["params/" + key] = w
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_npz_to_torch(tmp_path, scanned):
    flat = params(BV_CFG)
    src = write_npz(tmp_path / "vit.npz", flat, BV_CFG, scanned)
    before = tree_hash(src)
    result = cv.convert(src, tmp_path / "pt", "jax-to-torch")
    assert result["source_format"] == "big_vision" and tree_hash(src) == before
    assert_bitwise(layout.load_torch(tmp_path / "pt", BV_CFG), {n: np.ascontiguousarray(a) for n, a in jax_to_torch(flat, BV_CFG).items()})
    cfg = layout.read_checkpoint_config(tmp_path / "pt")
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.block, cfg.pool) == (48, 3, 3, 80, "sequential", "tok")


def test_big_vision_npz_to_timm(tmp_path):
    timm = pytest.importorskip("vitctl.convert.timm")
    flat = params(BV_CFG)
    src = write_npz(tmp_path / "vit.npz", flat, BV_CFG, scanned=True)
    cv.convert(src, tmp_path / "timm", "jax-to-torch", target_format="timm")
    want = timm.to_timm_state_dict(jax_to_torch(flat, BV_CFG), BV_CFG)
    assert_bitwise(layout.load_torch(tmp_path / "timm"), {n: np.ascontiguousarray(a) for n, a in want.items()})


def test_big_vision_npz_refuses_pickles_and_corruption(tmp_path):
    pytest.importorskip("vitctl.convert.big_vision")
    np.savez(tmp_path / "evil.npz", **{"params/embedding/kernel": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="object array.*refused"):
        cv.convert(tmp_path / "evil.npz", tmp_path / "pt", "jax-to-torch")
    good = write_npz(tmp_path / "vit.npz", params(BV_CFG), BV_CFG)
    good.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    with pytest.raises(CheckpointError, match="vit.npz"):
        cv.convert(good, tmp_path / "pt", "jax-to-torch")
    assert_nothing_written(tmp_path / "pt")


def test_timm_target(jax_src, tmp_path):
    timm = pytest.importorskip("vitctl.convert.timm")
    result = cv.convert(jax_src, tmp_path / "timm", "jax-to-torch", target_format="timm", max_shard_size="1KB")
    assert result["format"] == "timm" and result["shards"] == 1  # timm reads one file
    want = timm.to_timm_state_dict(jax_to_torch(params(), CFG), CFG)
    assert_bitwise(layout.load_torch(tmp_path / "timm"), {n: np.ascontiguousarray(a) for n, a in want.items()})
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == timm.timm_spec(CFG)["model_name"] and config["model_args"]["depth"] == 3
    assert layout.read_checkpoint_config(tmp_path / "timm") == CFG and config["provenance"]["target_format"] == "timm"
