"""big_vision .npz source: lazy reader, config inference, key table, and end-to-end parity.

The reference is big_vision's ViT re-written in flax linen (tests/convert/bv_reference.py) with
big_vision's module names, so its params tree has the real checkpoint layout. Each parity test
saves its random params as big_vision does (np.savez of "/"-joined names), reads them back
through vitctl.convert.big_vision into vitctl's JAX model and compares logits, pre-logits,
the encoder output and every block against the reference's own forward, in fp32 at
jax_default_matmul_precision="highest" (conftest).
"""

import dataclasses
import functools
import gc
import io
import weakref
import zipfile

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

import jax

from tests.conftest import jax_model
from tests.convert import bv_reference as ref
from vitctl import params
from vitctl.config import ViTConfig
from vitctl.convert import big_vision as bv
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError

BF16 = np.dtype(ml_dtypes.bfloat16)
# Every dimension differs: D=48, N=3, K=16, F=80, L=2, P=4, 16 px -> 4x4 grid, 10 classes.
TINY = {"num_classes": 10, "patch_size": 4, "width": 48, "depth": 2, "mlp_dim": 80, "num_heads": 3}
IMAGE = 16
TOL = 1e-5  # vitctl's fp32 bar


def reference(pool="gap", scan=False, posemb="learn", seed=0, **kw):
    model = ref.ViT(**{**TINY, **kw}, pool_type=pool, scan=scan, posemb=posemb)
    return model, ref.random_params(model, IMAGE, seed)


def images(n=2):
    return np.random.default_rng(7).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


@functools.cache
def reference_run(pool):
    """(flat params, (logits, out)) of the loop reference: one forward per pool type per session."""
    model, flat = reference(pool)
    return flat, ref.apply(model, flat, images())


def pyloop_to_scan(flat, depth):
    """big_vision's vit.pyloop_to_scan on flat names: encoderblock_{i}/x -> encoderblock/x with a leading depth axis."""
    out = {k: v for k, v in flat.items() if "/encoderblock_" not in k}
    for k in flat:
        if k.startswith("Transformer/encoderblock_0/"):
            rest = k[len("Transformer/encoderblock_0/") :]
            out[f"Transformer/encoderblock/{rest}"] = np.stack([flat[f"Transformer/encoderblock_{i}/{rest}"] for i in range(depth)])
    return out


def load_vitctl(p: bv.Plan):
    """vitctl's JAX model holding the plan's tensors (restacked to the model's (L, ...) layout).

    scan_layers=False: a forward-pass option that changes neither parameters nor the function
    (tests/model_jax covers it), and a Python loop of cached ops is faster here than compiling a scan.
    """
    return jax_model(dataclasses.replace(p.cfg, scan_layers=False), params.stack(dict(p.iter_tensors()), p.cfg.depth))


def max_diffs(reference_output, p: bv.Plan, x) -> dict[str, float]:
    """Max-abs difference per output between the reference's (logits, out) and vitctl's on x."""
    logits_ref, out_ref = reference_output
    logits, out = load_vitctl(p)(x)
    pairs = {
        "logits": (logits_ref, logits),
        "pre_logits": (out_ref["pre_logits"], out["pre_logits"]),
        "encoded": (out_ref["encoded"], out["encoded"]),
    }
    pairs.update({f"block{i:02d}": (b, out[f"block{i:02d}"]) for i, b in enumerate(out_ref["blocks"])})
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape, (name, a.shape, b.shape)
    return {name: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))) for name, (a, b) in pairs.items()}


# --- Parity with the big_vision reference --------------------------------------------------


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("pool", ["map", "gap", "tok"])
def test_logits_match_big_vision(tmp_path, pool, scan):
    flat, output = reference_run(pool)
    if scan:  # the same weights in nn.scan's layout; the real nn.scan model has exactly these keys and shapes
        flat = pyloop_to_scan(flat, TINY["depth"])
        model, _ = reference(pool, scan=True)
        abstract = ref.flatten_with_names(jax.eval_shape(model.init, jax.random.key(0), images(1))["params"])
        assert {k: v.shape for k, v in abstract.items()} == {k: v.shape for k, v in flat.items()}
        assert flat["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"].shape == (2, 48, 3, 16)
    path = tmp_path / "ckpt.npz"
    ref.save_npz(path, flat)
    p = bv.plan(path)
    c = p.cfg
    assert (c.width, c.depth, c.num_heads, c.mlp_dim, c.patch_size, c.image_size, c.channels, c.num_classes) == (48, 2, 3, 80, 4, 16, 3, 10)
    assert (c.pool, c.posemb, c.block, c.norm, c.norm_eps, c.gelu_approximate, c.qk_norm) == (
        pool,
        "learn",
        "sequential",
        "layernorm",
        1e-6,
        True,
        False,
    )
    assert c.qkv_bias and c.attn_out_bias and c.mlp_bias and c.norm_bias and c.param_dtype == "float32"
    diffs = max_diffs(output, p, images())
    assert max(diffs.values()) < TOL, diffs


def test_sincos_posemb_and_no_head(tmp_path):
    model, flat = reference("gap", posemb="sincos2d", num_classes=0)
    assert "pos_embedding" not in flat and not any(k.startswith("head/") for k in flat)
    path = tmp_path / "ckpt.npz"
    ref.save_npz(path, flat)
    p = bv.plan(path)
    assert (p.cfg.posemb, p.cfg.image_size, p.cfg.num_classes) == ("sincos2d", 224, 0)
    assert any("image size unknown; assumed 224" in n for n in p.notes)
    p = bv.plan(path, overrides={"image_size": IMAGE})
    assert not any("image size" in n for n in p.notes)
    # vitctl.posemb computes big_vision's formula in float64 (big_vision: float32 jnp), so the
    # embeddings differ by ~1e-7 here (~1e-6 at 16x16): inside the tolerance, not bitwise.
    diffs = max_diffs(ref.apply(model, flat, images()), p, images())
    assert max(diffs.values()) < TOL, diffs


def test_bf16_checkpoint_is_read_bitwise_and_matches(tmp_path):
    model, flat = reference("map", scan=True)
    flat16 = {k: v.astype(BF16) for k, v in flat.items()}
    path = tmp_path / "ckpt.npz"
    ref.save_npz(path, flat16)
    with np.load(path, allow_pickle=False) as z:  # what big_vision's npz checkpoints hold on disk
        assert z["embedding/kernel"].dtype == np.dtype("V2")
    p = bv.plan(path)
    assert p.cfg.param_dtype == "bfloat16" and {e.dtype for e in p.entries} == {BF16}
    got = dict(p.iter_tensors())
    for e in p.entries:
        stored = flat16[e.key] if e.index is None else flat16[e.key][e.index]
        assert got[e.name].dtype == BF16 and np.array_equal(got[e.name].view(np.uint16), stored.view(np.uint16)), e.name
    # The same function: bf16 weights, fp32 compute on both sides (the reference, a genuine
    # nn.scan model, runs on the exact fp32 upcast: see the MAP-head note in big_vision.py).
    diffs = max_diffs(ref.apply(model, {k: v.astype(np.float32) for k, v in flat16.items()}, images()), p, images())
    assert max(diffs.values()) < TOL, diffs


# --- Prefixes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_ckpt():
    return reference("tok")


def tensors(p):
    return {n: np.array(w) for n, w in p.iter_tensors()}


@pytest.mark.parametrize("wrapper", ["params/", "opt/target/"])
def test_big_vision_wrappers_are_detected(tmp_path, tok_ckpt, wrapper):
    _, flat = tok_ckpt
    ref.save_npz(tmp_path / "bare.npz", flat)
    extra = {"opt/state/step": np.array(3)} if wrapper == "opt/target/" else {}
    ref.save_npz(tmp_path / "wrapped.npz", flat, prefix=wrapper, extra=extra)
    bare, wrapped = bv.plan(tmp_path / "bare.npz"), bv.plan(tmp_path / "wrapped.npz")
    assert (bare.prefix, wrapped.prefix) == ("", wrapper)
    assert wrapped.cfg == bare.cfg and wrapped.shapes() == bare.shapes()
    assert wrapped.ignored == tuple(extra)
    a, b = tensors(bare), tensors(wrapped)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_two_tower_needs_a_prefix(tmp_path, tok_ckpt):
    _, flat = tok_ckpt
    txt = {"params/txt/Embed_0/embedding": np.zeros((7, 8), np.float32), "params/txt/head/kernel": np.zeros((8, 4), np.float32)}
    path = tmp_path / "siglip.npz"
    ref.save_npz(path, flat, prefix="params/img/", extra={**txt, "params/t": np.array(1.0), "params/b": np.array(0.0)})
    with pytest.raises(ConfigError, match=r"several sub-trees \(params/b, params/img, params/t, params/txt\)") as e:
        bv.plan(path)
    assert "--prefix" in e.value.hint and "params/img" in e.value.hint
    ref.save_npz(tmp_path / "bare.npz", flat)
    bare = tensors(bv.plan(tmp_path / "bare.npz"))
    for prefix in ("params/img", "params/img/", "/params/img/"):
        p = bv.plan(path, prefix=prefix)
        assert p.prefix == "params/img/" and len(p.ignored) == 4 and any("4 arrays outside" in n for n in p.notes)
        got = tensors(p)
        assert got.keys() == bare.keys() and all(np.array_equal(got[k], bare[k]) for k in got)
    with pytest.raises(ConfigError, match="no key of the checkpoint starts with prefix 'params/image/'"):
        bv.plan(path, prefix="params/image")
    with pytest.raises(CheckpointError, match="no 'params/embedding/kernel' in the checkpoint"):
        bv.plan(path, prefix="params")
    with pytest.raises(UnmappedParamError, match=r"44 key\(s\) match no row of the big_vision key table: 'params/b', 'params/img/"):
        bv.plan(path, prefix="params", cfg=bv.plan(path, prefix="params/img").cfg)  # the text tower's keys are not a ViT's


def test_two_vit_towers_are_ambiguous(tmp_path, tok_ckpt):
    _, flat = tok_ckpt
    arrays = {**{f"student/{k}": v for k, v in flat.items()}, **{f"teacher/{k}": v for k, v in flat.items()}}
    ref.save_npz(tmp_path / "two.npz", arrays)
    with pytest.raises(ConfigError, match="ambiguous") as e:
        bv.plan(tmp_path / "two.npz")
    assert e.value.hint == "pass --prefix, one of: student, teacher"
    assert bv.plan(tmp_path / "two.npz", prefix="teacher").cfg.pool == "tok"


# --- Config: inference and overrides --------------------------------------------------------


def test_given_config_and_overrides(tmp_path, tok_ckpt):
    _, flat = tok_ckpt
    path = tmp_path / "ckpt.npz"
    ref.save_npz(path, flat)
    inferred = bv.plan(path).cfg
    assert bv.plan(path, cfg=inferred).cfg == inferred
    assert bv.plan(path, overrides={"gelu_approximate": False}).cfg == dataclasses.replace(inferred, gelu_approximate=False)
    with pytest.raises(ConfigError, match="invalid config override"):
        bv.plan(path, overrides={"no_such_field": 1})
    # A preset that does not describe the weights: the mismatch is named, not half-loaded.
    with pytest.raises(UnmappedParamError, match=r"'pos_embed' has shape \(1, 16, 48\), expected \(1, 3136, 48\)"):
        bv.plan(path, cfg=ViTConfig.from_variant("mu/16", width=48, depth=2, mlp_dim=80, num_heads=3, patch_size=4, num_classes=10))
    with pytest.raises(UnmappedParamError, match=r"blocks/0/q_norm/scale \(no big_vision equivalent\)"):
        bv.plan(path, cfg=dataclasses.replace(inferred, qk_norm=True))


def test_infer_config_needs_headers_only():
    shapes = {  # a B/16 at 384 px with a MAP head, scanned, as header shapes only
        "params/embedding/kernel": ((16, 16, 3, 768), np.dtype("float32")),
        "params/pos_embedding": ((1, 576, 768), np.dtype("float32")),
        "params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": ((12, 768, 12, 64), np.dtype("float32")),
        "params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/bias": ((12, 12, 64), np.dtype("float32")),
        "params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": ((12, 768, 3072), np.dtype("float32")),
        "params/MAPHead_0/probe": ((1, 1, 768), np.dtype("float32")),
        "params/head/kernel": ((768, 21843), np.dtype("float32")),
    }
    c = bv.infer_config(shapes)
    assert (c.width, c.depth, c.num_heads, c.mlp_dim, c.patch_size, c.image_size, c.pool, c.num_classes) == (
        768,
        12,
        12,
        3072,
        16,
        384,
        "map",
        21843,
    )
    assert c.qkv_bias and not c.attn_out_bias and not c.norm_bias  # biases follow the keys present
    with pytest.raises(CheckpointError, match="class-token slot"):
        bv.infer_config({**shapes, "params/pos_embedding": ((1, 577, 768), np.dtype("float32"))})


# --- Errors -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, tok_ckpt):
    """A writer of variants of the tok checkpoint: saved(drop=..., add=...) -> path."""

    def write(drop=(), add=None, scan=False, name="ckpt.npz"):
        flat = tok_ckpt[1] if not scan else reference("tok", scan=True)[1]
        flat = {k: v for k, v in flat.items() if k not in drop}
        ref.save_npz(tmp_path / name, flat, extra=add)
        return tmp_path / name

    return write


def test_unknown_key_is_named(saved):
    path = saved(add={"Transformer/encoderblock_0/Foo_0/kernel": np.zeros(3, np.float32), "extra": np.zeros(1, np.float32)})
    with pytest.raises(UnmappedParamError, match=r"2 key\(s\) match no row .*'Transformer/encoderblock_0/Foo_0/kernel', 'extra'"):
        bv.plan(path)
    path = saved(add={"Transformer/encoderblock/Foo_0/kernel": np.zeros((2, 3), np.float32)}, scan=True)
    with pytest.raises(UnmappedParamError, match=r"1 key\(s\) match no row .*'Transformer/encoderblock/Foo_0/kernel'"):
        bv.plan(path)


def test_missing_key_is_named_in_big_vision_terms(saved):
    with pytest.raises(UnmappedParamError, match=r"missing 1 tensor\(s\) the config needs: 'Transformer/encoderblock_1/LayerNorm_1/bias'"):
        bv.plan(saved(drop={"Transformer/encoderblock_1/LayerNorm_1/bias"}))
    with pytest.raises(
        UnmappedParamError,
        match=r"missing 2 .*'Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel', 'Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel'",
    ):
        bv.plan(saved(drop={"Transformer/encoderblock/MlpBlock_0/Dense_1/kernel"}, scan=True))
    with pytest.raises(UnmappedParamError, match=r"missing 1 .*'cls'"):  # inferred tok needs cls: only a given config can say so
        bv.plan(saved(drop={"cls"}), cfg=bv.plan(saved(name="full.npz")).cfg)


def test_scanned_and_unscanned_blocks_together_are_refused(saved, tok_ckpt):
    scanned = {k: v for k, v in reference("tok", scan=True)[1].items() if "/encoderblock/" in k}
    with pytest.raises(CheckpointError, match="both scanned"):
        bv.plan(saved(add=scanned))


def test_pre_logits_is_refused_clearly(tmp_path):
    _, flat = reference("gap", rep_size=48)
    assert flat["pre_logits/kernel"].shape == (48, 48)
    ref.save_npz(tmp_path / "ckpt.npz", flat)
    with pytest.raises(UnmappedParamError, match=r"cannot represent: 'pre_logits/bias': big_vision's `rep_size` pre-logits layer"):
        bv.plan(tmp_path / "ckpt.npz")


def test_truncated_file_is_named(saved):
    path = saved()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable \.npz") as e:
        bv.plan(path)
    assert "truncated" in e.value.hint
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable"):
        bv.open_npz(path)
    with pytest.raises(CheckpointError, match="no such file"):
        bv.open_npz(path.with_name("absent.npz"))


def test_corrupt_member_is_named_and_headers_need_no_data(saved):
    path = saved()
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel.npy")  # (48, 80) float32: 15 KiB
    data[info.header_offset + 30 + len(info.filename) + 12000] ^= 0xFF  # a byte of the array data, past the first read
    path.write_bytes(bytes(data))
    p = bv.plan(path)  # planning reads headers only (zipfile reads 4 KiB at a time): the corrupt byte is not touched yet
    with pytest.raises(CheckpointError, match=r"member 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': Bad CRC-32"):
        dict(p.iter_tensors())


def test_object_array_is_refused(saved):
    path = saved(add={"head/kernel": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match=r"member 'head/kernel' is an object array, which needs pickle.*refused"):
        bv.plan(path)


def test_member_size_must_match_its_header(tmp_path):
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as z:  # a header that promises more data than the member has
        buf = np.lib.format.header_data_from_array_1_0(np.zeros((4, 4), np.float32))
        f = io.BytesIO()
        np.lib.format.write_array_header_1_0(f, buf)
        z.writestr("embedding/kernel.npy", f.getvalue() + b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"member 'embedding/kernel': the header promises \d+ bytes"):
        bv.open_npz(path).shapes()


# --- The reader and the key table ------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_reader_matches_np_load(tmp_path, compressed):
    rng = np.random.default_rng(0)
    arrays = {
        "a/b/c": rng.normal(size=(3, 5)).astype(np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(4, 6))),
        "big_endian": rng.normal(size=(7,)).astype(">f4"),
        "scalar": np.array(2.5, np.float32),
        "ints": np.arange(10, dtype=np.int32),
        "empty": np.zeros((0, 3), np.float32),
        "bf16": rng.normal(size=(2, 3)).astype(BF16),
    }
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    with bv.open_npz(path) as r, np.load(path, allow_pickle=False) as z:
        assert r.keys() == list(arrays)
        assert r.shapes() == {k: (v.shape, v.dtype if v.dtype != ">f4" else np.dtype(">f4")) for k, v in arrays.items()}
        for k, v in arrays.items():
            got = r.read(k)
            assert got.shape == v.shape and got.dtype == (v.dtype.newbyteorder("=") if k == "big_endian" else v.dtype)
            assert got.flags.c_contiguous and np.array_equal(
                got.view(np.uint8) if k == "bf16" else got, z[k].view(np.uint8) if k == "bf16" else z[k]
            )


def test_each_member_is_read_once(saved, monkeypatch):
    path = saved(scan=True)
    reads = []
    original = bv.NpzReader.read
    monkeypatch.setattr(bv.NpzReader, "read", lambda self, key: reads.append(key) or original(self, key))
    layers = bv.NpzReader.iter_layers
    monkeypatch.setattr(bv.NpzReader, "iter_layers", lambda self, key: reads.append(key) or layers(self, key))
    p = bv.plan(path)
    assert reads == []  # planning reads no data
    names = [n for n, _ in bv.iter_jax_tensors(path)]
    assert sorted(names) == sorted(params.jax_param_shapes(p.cfg, stacked=False))
    with zipfile.ZipFile(path) as z:
        assert sorted(reads) == sorted(n[: -len(".npy")] for n in z.namelist())  # one read per member
    assert p.entries[0].nbytes == int(np.prod(p.entries[0].shape)) * 4


@pytest.mark.parametrize("kw", [{"pool": "map"}, {"pool": "tok", "posemb": "learn"}])
def test_key_table_covers_every_vitctl_tensor_both_ways(kw):
    cfg = ViTConfig.from_variant("B/16", **kw)
    for name in params.jax_param_shapes(cfg, stacked=False):
        back = bv.to_big_vision(name)
        assert back is not None and bv.to_vitctl(back) == name, name
    assert bv.to_vitctl("Transformer/encoderblock_3/MultiHeadDotProductAttention_0/out/kernel") == "blocks/3/attn_out/kernel"
    assert bv.to_vitctl("MAPHead_0/MlpBlock_0/Dense_1/bias") == "map_head/mlp_out/bias"
    assert bv.to_vitctl("embedding/scale") is None and bv.to_big_vision("blocks/0/q_norm/scale") is None


class _TrackingReader(bv.NpzReader):
    """Records a weak reference to every array it hands out, and which are still alive at each read."""

    def __init__(self, path):
        super().__init__(path)
        self.handed, self.alive_at_read = [], []

    def _note(self, key):
        gc.collect()
        self.alive_at_read.append((key, [k for k, r in self.handed if r() is not None]))

    def read(self, key):
        self._note(key)
        array = super().read(key)
        self.handed.append((key, weakref.ref(array.base if array.base is not None else array)))
        return array

    def iter_layers(self, key):
        self._note(key)
        for w in super().iter_layers(key):
            self.handed.append((key, weakref.ref(w.base if w.base is not None else w)))
            yield w


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_at_most_one_member_is_alive(saved, scan):
    path = saved(scan=scan)
    p = bv.plan(path)
    with _TrackingReader(path) as r:
        it = p.iter_tensors(r)
        n = 0
        while (item := next(it, None)) is not None:  # the consumer drops each tensor before asking for the next
            n += 1
            del item
        assert n == len(p.entries)
        assert r.alive_at_read and all(alive == [] for _, alive in r.alive_at_read), r.alive_at_read


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_iter_layers_matches_np_load(tmp_path, compressed):
    rng = np.random.default_rng(1)
    arrays = {
        "f32": rng.normal(size=(5, 3, 4)).astype(np.float32),
        "bf16": rng.normal(size=(4, 6)).astype(BF16),
        "big_endian": rng.normal(size=(3, 2)).astype(">f4"),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5)).astype(np.float32)),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    with bv.open_npz(path) as r:
        for k, v in arrays.items():
            got = list(r.iter_layers(k))
            assert len(got) == v.shape[0]
            for i, g in enumerate(got):
                assert g.flags.c_contiguous and g.shape == v.shape[1:]
                assert g.dtype == (BF16 if k == "bf16" else v.dtype.newbyteorder("="))
                assert g.tobytes() == np.ascontiguousarray(v[i]).astype(g.dtype).tobytes()


def test_scanned_member_is_read_per_layer(saved, monkeypatch):
    path = saved(scan=True)
    with bv.open_npz(path) as r:
        key = "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
        (L, *rest), _ = r.header(key)
        sizes = []
        original = bv.NpzReader._read_span
        monkeypatch.setattr(
            bv.NpzReader,
            "_read_span",
            lambda self, k, h, fd, off, count, *a: sizes.append(count) or original(self, k, h, fd, off, count, *a),
        )
        layers = list(r.iter_layers(key))
        assert len(layers) == L and sizes == [int(np.prod(rest))] * L  # one layer per read (mapped), never the stack
        assert all(not a.flags.writeable for a in layers)  # views of the file's pages
        with np.load(path) as z:
            assert np.array_equal(np.stack(layers), z[key])


def test_corrupt_scanned_member_fails_after_its_last_layer(saved):
    path = saved(scan=True)
    key = "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(key + ".npy")
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF  # in layer 0's data
    path.write_bytes(bytes(data))
    with bv.open_npz(path) as r, pytest.raises(CheckpointError, match=rf"member '{key}': Bad CRC-32"):
        list(r.iter_layers(key))
    with pytest.raises(CheckpointError, match=rf"member '{key}': Bad CRC-32"):
        dict(bv.plan(path).iter_tensors())


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_held_bytes_is_one_layer_of_a_stored_scanned_member(tmp_path, compressed):
    x = np.zeros((6, 4, 5), np.float32)
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, s=np.float32(1), e=np.zeros((0, 2), np.float32))
    with bv.open_npz(path) as r:
        assert r.held_bytes("x") == x.nbytes
        assert r.held_bytes("x", per_layer=True) == (x.nbytes if compressed else x[0].nbytes)
        assert r.held_bytes("s", per_layer=True) == 4 and r.held_bytes("e", per_layer=True) == 0
