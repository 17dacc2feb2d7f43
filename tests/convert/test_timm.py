"""timm as an export target: the create_model spec, the tensor table, streaming, and parity.

Parity: random params -> vitctl torch model and -> timm state_dict; timm's own VisionTransformer
built from the JSON spec loads it with strict=True; logits and pre-logits agree to 1e-5 in fp32.
"""

import json
import re

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import random_params, tiny
from vitctl.config import PRESETS, ViTConfig
from vitctl.convert import mapping
from vitctl.convert import timm as vt
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError
from vitctl.params import unstack

CLASSIC = {"block": "sequential", "qk_norm": False, "qkv_bias": True, "norm": "layernorm", "norm_bias": True, "gelu_approximate": True}
FAMILIES = {
    # like vit_base_patch16_224, tiny: D=48, L=2, N=3, F=80, P=4, 16 px, 10 classes
    "classic-tok": tiny(**CLASSIC, pool="tok"),
    "classic-gap": tiny(**CLASSIC, pool="gap"),
    "classic-map": tiny(**CLASSIC, pool="map"),
    # ViT-22B style: vitctl's defaults (parallel, QK-norm, rmsnorm, no QKV bias, MAP head, exact GELU)
    "parallel-22b": tiny(),
    "parallel-layernorm-qkvbias-gap": tiny(norm="layernorm", qkv_bias=True, pool="gap"),
    "parallel-nobias-layernorm-tok": tiny(norm="layernorm", norm_bias=False, attn_out_bias=False, mlp_bias=False, pool="tok"),
    "sequential-qknorm-rms-sincos-none": tiny(block="sequential", posemb="sincos2d", pool="none", mlp_bias=False),
    "parallel-sincos-map-noclasses": tiny(posemb="sincos2d", qkv_bias=True, num_classes=0, attn_out_bias=False),
    # class_posemb, norm_pre (the patch bias folded into pos_embed), fc_norm, layer_scale
    "classic-class-posemb": tiny(**CLASSIC, pool="tok", class_posemb=True),
    "classic-norm-pre-fc-norm-layer-scale-gap": tiny(**CLASSIC, pool="gap", norm_pre=True, fc_norm=True, layer_scale=0.1),
    "parallel-layer-scale-norm-pre-map-fc-norm": tiny(layer_scale=0.1, norm_pre=True, pool="map", fc_norm=True),
    "sequential-sincos-norm-pre-tok": tiny(block="sequential", posemb="sincos2d", norm_pre=True, pool="tok"),
}


def export_params(cfg: ViTConfig):
    """random_params, with the parallel block's two layer scales tied: timm's ParallelScalingBlock has one."""
    params = random_params(cfg)
    if cfg.layer_scale and cfg.block == "parallel":
        params["blocks/ls_mlp/scale"] = params["blocks/ls_attn/scale"]
    return params


def timm_model(cfg: ViTConfig):
    timm = pytest.importorskip("timm")
    spec = json.loads(json.dumps(vt.timm_spec(cfg)))  # what config.json / --json carries
    return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).eval()


def load(model, state):
    import torch

    result = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_model_computes_the_same_function(name):
    torch = pytest.importorskip("torch")
    from tests.conftest import torch_model

    cfg = FAMILIES[name]
    params = export_params(cfg)
    ours = torch_model(cfg, params)
    theirs = load(timm_model(cfg), vt.to_timm_state_dict(mapping.jax_to_torch(params, cfg), cfg))
    images = torch.from_numpy(np.random.default_rng(1).normal(size=(3, cfg.channels, cfg.image_size, cfg.image_size)).astype(np.float32))
    with torch.no_grad():
        logits, out = ours(images)
        pre_logits = theirs.forward_head(theirs.forward_features(images), pre_logits=True)
        timm_logits = theirs(images)
    assert timm_logits.shape == logits.shape and pre_logits.shape == out["pre_logits"].shape
    assert (pre_logits - out["pre_logits"]).abs().max().item() < 1e-5
    assert (timm_logits - logits).abs().max().item() < 1e-5
    assert logits.abs().max().item() > 0.1  # not trivially zero


def test_timm_table_speaks_the_parameter_table():
    from vitctl import params

    rules = (*vt.EMBED_RULES, *vt.BLOCK_RULES["sequential"], *vt.BLOCK_RULES["parallel"], *vt.HEAD_RULES)
    assert {p for r in rules for p in r.parts} <= {p.torch for p in params.PARAMS}  # vitctl torch templates, `{i}` per block
    assert {w for r in rules for w in r.when} <= set(vt.WHEN) and params.WHEN.items() <= vt.WHEN.items()


@pytest.mark.parametrize("name", FAMILIES)
def test_plan_matches_timm_state_dict(name):
    cfg = FAMILIES[name]
    model = timm_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == vt.timm_param_shapes(cfg)
    assert list(model.state_dict()) == [t.name for t in vt.timm_tensor_plan(cfg)]  # timm's own order


def test_plan_matches_timm_state_dict_and_block_type():
    cfg = FAMILIES["parallel-22b"]
    model = timm_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == vt.timm_param_shapes(cfg)
    assert list(model.state_dict()) == [t.name for t in vt.timm_tensor_plan(cfg)]  # timm's own order
    assert type(model.blocks[0]).__name__ == "ParallelScalingBlock"
    assert type(timm_model(FAMILIES["classic-tok"]).blocks[0]).__name__ == "Block"


def test_fused_layouts():
    """in_proj is [mlp_in; q; k; v] (timm splits the MLP first), attn.qkv [q; k; v], kv [k; v]."""
    cfg = tiny(qkv_bias=True)
    state = mapping.jax_to_torch(random_params(cfg), cfg)
    sd = vt.to_timm_state_dict(state, cfg)
    b = "blocks.1."
    np.testing.assert_array_equal(sd[b + "in_proj.weight"], np.concatenate([state[b + n + ".weight"] for n in ("mlp_in", "q", "k", "v")]))
    np.testing.assert_array_equal(sd[b + "in_proj.bias"][: cfg.mlp_dim], state[b + "mlp_in.bias"])
    np.testing.assert_array_equal(sd["attn_pool.kv.weight"], np.concatenate([state["map_head.k.weight"], state["map_head.v.weight"]]))
    seq = tiny(**CLASSIC)
    state = mapping.jax_to_torch(random_params(seq), seq)
    qkv = vt.to_timm_state_dict(state, seq)[b + "attn.qkv.weight"]
    np.testing.assert_array_equal(qkv, np.concatenate([state[b + n + ".weight"] for n in "qkv"]))


def test_streaming_holds_one_group_and_keeps_dtype():
    cfg = tiny(qkv_bias=False, posemb="sincos2d")  # zero biases and the sin-cos table are filled
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in mapping.jax_to_torch(random_params(cfg), cfg).items()}
    plan = vt.timm_tensor_plan(cfg)
    order = [s for t in plan for s in t.sources]  # the read order a driver gets from the plan
    emitted, held = set(), []

    def feed():
        for i, name in enumerate(order):
            held.append(len(set(order[:i]) - emitted))  # read but not yet part of a yielded tensor
            yield name, state[name]

    out = {}
    for name, w in vt.iter_timm_tensors(feed(), cfg):
        out[name] = w
        emitted.update(next(t for t in plan if t.name == name).sources)
    assert max(held) == 3  # the parts of one in_proj (mlp_in, q, k) wait for v; nothing else is kept
    assert set(out) == {t.name for t in plan}
    assert all(w.dtype == ml_dtypes.bfloat16 for w in out.values())
    assert not out["attn_pool.q.bias"].any() and out["pos_embed"].any()
    # Any order works; the result does not depend on it.
    shuffled = dict(vt.iter_timm_tensors(reversed(list(state.items())), cfg))
    assert all(np.array_equal(shuffled[k], out[k]) for k in out)


def test_streaming_errors():
    cfg = tiny()
    state = mapping.jax_to_torch(random_params(cfg), cfg)
    items = list(state.items())
    with pytest.raises(UnmappedParamError, match="not a parameter"):
        list(vt.iter_timm_tensors(items + [("blocks.0.q.bias", np.zeros(48, np.float32))], cfg))
    with pytest.raises(UnmappedParamError, match="twice"):
        list(vt.iter_timm_tensors(items + items[:1], cfg))
    with pytest.raises(UnmappedParamError, match="missing 1 .*head.bias"):
        list(vt.iter_timm_tensors([(k, v) for k, v in items if k != "head.bias"], cfg))
    with pytest.raises(CheckpointError, match="shape"):
        list(vt.iter_timm_tensors([("norm.weight", np.zeros(47, np.float32))], cfg))


def test_untied_parallel_layer_scales_are_refused():
    cfg = FAMILIES["parallel-layer-scale-norm-pre-map-fc-norm"]
    state = mapping.jax_to_torch(random_params(cfg), cfg)  # ls_attn and ls_mlp drawn apart
    with pytest.raises(CheckpointError, match="blocks.0.ls_attn.weight and blocks.0.ls_mlp.weight differ") as e:
        vt.to_timm_state_dict(state, cfg)
    assert "--format vitctl" in e.value.hint
    tied = mapping.jax_to_torch(export_params(cfg), cfg)
    back = vt.from_timm_state_dict(vt.to_timm_state_dict(tied, cfg), cfg)
    assert np.array_equal(back["blocks.1.ls_mlp.weight"], tied["blocks.1.ls_attn.weight"])


def test_folded_patch_bias_reads_back_as_zeros_in_pos_embed():
    cfg = FAMILIES["classic-norm-pre-fc-norm-layer-scale-gap"]
    state = mapping.jax_to_torch(random_params(cfg), cfg)
    sd = vt.to_timm_state_dict(state, cfg)
    assert "patch_embed.proj.bias" not in sd
    np.testing.assert_allclose(sd["pos_embed"], state["pos_embed"] + state["patch_embed.proj.bias"], rtol=0, atol=0)
    back = vt.from_timm_state_dict(sd, cfg)
    assert not back["patch_embed.proj.bias"].any() and np.array_equal(back["pos_embed"], sd["pos_embed"])


def test_fixed_parts_are_checked_when_read_back():
    """A tensor vitctl's model fixes (the sin-cos table, a bias it has not) must hold that, or is named."""
    cfg = FAMILIES["parallel-sincos-map-noclasses"]  # sin-cos posemb; attn_out bias off, so attn_pool.proj.bias is zeros
    sd = vt.to_timm_state_dict(mapping.jax_to_torch(random_params(cfg), cfg), cfg)
    vt.from_timm_state_dict(sd, cfg)  # as written: fine
    for name in ("pos_embed", "attn_pool.proj.bias", "blocks.1.attn_out_proj.bias"):
        bad = {**sd, name: sd[name] + np.float32(0.01)}
        with pytest.raises(CheckpointError, match=re.escape(f"timm tensor {name}")) as e:
            vt.from_timm_state_dict(bad, cfg)
        assert "sin-cos" in str(e.value) if name == "pos_embed" else "must hold zeros" in str(e.value)


def test_spec_round_trips_through_json():
    for cfg in [*FAMILIES.values(), PRESETS["vit-22b"], PRESETS["B/16"]]:
        spec = vt.timm_spec(cfg)
        assert json.loads(json.dumps(spec)) == spec
        assert json.loads(json.dumps(vt.timm_hub_config(cfg)))["model_args"]["mlp_ratio"] == spec["kwargs"]["mlp_ratio"]
    spec = vt.timm_spec(PRESETS["vit-22b"])
    assert spec["model_name"] == "vit_base_patch16_xp_224"
    expected = {
        "embed_dim": 6144,
        "depth": 48,
        "num_heads": 48,
        "mlp_ratio": 4.0,
        "patch_size": 14,
        "global_pool": "map",
        "norm_layer": "rmsnormfp32",
    }
    assert {k: spec["kwargs"][k] for k in expected} == expected


def test_mlp_ratio_gives_mlp_dim_exactly():
    for cfg in [*PRESETS.values(), tiny(mlp_dim=4304, width=1152, num_heads=16)]:
        r = json.loads(json.dumps(vt.mlp_ratio(cfg)))
        assert int(cfg.width * r) == int(r * cfg.width) == cfg.mlp_dim


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"norm_eps": 1e-5}, "norm_eps"),
        ({"norm": "rmsnorm", "norm_bias": True}, "RmsNorm has no bias"),
        ({"softmax_dtype": "compute", "dtype": "bfloat16"}, "bfloat16"),
    ],
)
def test_inexpressible_configs_raise(overrides, reason):
    cfg = tiny(**overrides)
    for fn in (vt.timm_spec, vt.timm_tensor_plan, vt.timm_hub_config):
        with pytest.raises(ConfigError, match=reason) as e:
            fn(cfg)
        assert "--format vitctl" in e.value.hint
    with pytest.raises(ConfigError):
        list(vt.iter_timm_tensors([], cfg))


def test_local_dir_checkpoint_loads_with_timm(tmp_path):
    """timm_hub_config + one model.safetensors: timm.create_model("local-dir:...") restores the model."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    cfg = FAMILIES["classic-map"]
    sd = vt.to_timm_state_dict(mapping.jax_to_torch(random_params(cfg), cfg), cfg)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(vt.timm_hub_config(cfg)))
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    reference = load(timm_model(cfg), sd)
    x = torch.zeros(1, 3, 16, 16).normal_()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, 16, 16) and tuple(data["mean"]) == (0.5,) * 3 and data["crop_pct"] == 1.0
    assert tuple(timm.data.resolve_model_data_config(timm_model(cfg))["input_size"]) == (3, 16, 16)  # JSON: a list


def test_convert_cli_prints_the_calls_that_load_the_export(tmp_path, capsys):
    """`vitctl convert ... --format timm` prints (and --json carries) the timm.create_model calls; each
    one, run as printed, loads the written files into the same model. Other commands name the format."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from vitctl import checkpoint as ckpt
    from vitctl.cli import main
    from vitctl.formats import layout

    cfg = FAMILIES["parallel-22b"]
    src = tmp_path / "jax"
    src.mkdir()
    layout.save_jax(src, random_params(cfg))
    ckpt.write_config(src, cfg, {"source_format": "test"})

    def cli(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        return e.value.code, *capsys.readouterr()

    code, out, err = cli("convert", "jax-to-torch", src, tmp_path / "t", "--format", "timm")
    assert code == 0 and out.strip() == str(tmp_path / "t")
    assert f"load it with timm: timm.create_model('local-dir:{tmp_path / 't'}', pretrained=True)" in err
    code, out, _ = cli("convert", "jax-to-torch", src, tmp_path / "t2", "--format", "timm", "--json")
    calls = json.loads(out)["timm"]
    assert calls["create_model"] == f"timm.create_model('local-dir:{tmp_path / 't2'}', pretrained=True)"
    reference = load(timm_model(cfg), vt.to_timm_state_dict(mapping.jax_to_torch(random_params(cfg), cfg), cfg))
    x = torch.zeros(2, 3, 16, 16).normal_()
    for call in (calls["create_model"], calls["create_model_explicit"]):
        model = eval(call, {"timm": timm}).eval()  # the printed line, as a user pastes it
        with torch.no_grad():
            assert torch.equal(model(x), reference(x)), call

    code, out, _ = cli("info", tmp_path / "t", "--json")
    assert code == 0 and json.loads(out)["formats"] == ["timm"]
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "t", tmp_path / "back")  # a timm export reads back
    assert code == 0, err
    from vitctl.open import open_checkpoint

    with open_checkpoint(tmp_path / "back") as back:
        assert back.cfg.width == cfg.width and back.cfg.block == cfg.block
        got = back.params()
    want = dict(unstack(random_params(cfg), cfg.depth))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
