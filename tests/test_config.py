"""ViTConfig: presets, validation errors that name the field, JSON round trip."""

import dataclasses
import json

import pytest

from vitctl.config import PRESETS, Preprocess, ViTConfig, load_config
from vitctl.errors import ConfigError


def test_presets_cover_the_paper_and_big_vision():
    c = ViTConfig.from_variant("vit-22b")
    assert (c.width, c.depth, c.mlp_dim, c.num_heads, c.patch_size, c.image_size) == (6144, 48, 24576, 48, 14, 224)
    assert (c.block, c.qk_norm, c.qkv_bias, c.norm, c.norm_bias, c.pool) == ("parallel", True, False, "rmsnorm", False, "map")
    assert c.head_dim == 128 and c.seq_len == 256
    g, e = ViTConfig.from_variant("vit-G/14"), ViTConfig.from_variant("vit-e/14")
    assert (g.width, g.depth, g.mlp_dim, g.num_heads) == (1664, 48, 8192, 16)
    assert (e.width, e.depth, e.mlp_dim, e.num_heads) == (1792, 56, 15360, 16)
    b = ViTConfig.from_variant("B/16")
    assert (b.block, b.qkv_bias, b.norm, b.norm_eps, b.gelu_approximate, b.pool) == ("sequential", True, "layernorm", 1e-6, True, "tok")
    for v in ("mu", "Ti", "S", "M", "B", "L", "H", "g", "G", "e"):
        for p in (8, 14, 16, 32):
            assert f"{v}/{p}" in PRESETS
    assert "vit22b-mu/16" in PRESETS and "vit22b-B/16" in PRESETS and "vit22b-1B/14" in PRESETS


def test_overrides_and_json_round_trip():
    c = ViTConfig.from_variant("B/16", num_classes=0, preprocess=Preprocess(value_range=None, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert ViTConfig.from_json(c.to_json()) == c
    assert json.loads(c.to_json())["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    for name, cfg in PRESETS.items():
        assert ViTConfig.from_dict(json.loads(cfg.to_json())) == cfg, name


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"width": 50, "num_heads": 3}, "width 50 is not divisible by num_heads 3"),
        ({"image_size": 30, "patch_size": 4}, "image_size 30 is not divisible by patch_size 4"),
        ({"pool": "cls"}, "unknown pool 'cls'"),
        ({"norm": "batchnorm"}, "unknown norm 'batchnorm'"),
        ({"block": "moe"}, "unknown block 'moe'"),
        ({"posemb": "rope"}, "unknown posemb 'rope'"),
        ({"dtype": "float16"}, "unknown dtype 'float16'"),
        ({"depth": 0}, "depth must be positive"),
        ({"depth": 2.5}, "depth must be an integer"),
        ({"qk_norm": "yes"}, "qk_norm must be true or false"),
        ({"norm_eps": 0}, "norm_eps must be in"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
    ],
)
def test_invalid_values_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        dataclasses.replace(ViTConfig(), **kw)
    assert e.value.exit_code == 2


def test_choice_errors_list_the_choices():
    with pytest.raises(ConfigError) as e:
        ViTConfig(pool="cls")
    assert "map, gap, tok, none" in e.value.hint


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown model preset 'vit-22B'") as e:
        ViTConfig.from_variant("vit-22B")
    assert "'vit-22b'" in e.value.hint and "vitctl models" in e.value.hint


def test_unknown_json_fields_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field.*: mlp_ratio"):
        ViTConfig.from_dict({**ViTConfig().to_dict(), "mlp_ratio": 4})
    with pytest.raises(ConfigError, match="not valid JSON"):
        ViTConfig.from_json("{")
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": ViTConfig().to_dict(), "provenance": {}}))
    assert load_config(tmp_path) == ViTConfig()


def test_preprocess_needs_exactly_one_normalisation():
    with pytest.raises(ConfigError, match="exactly one of value_range or mean/std"):
        Preprocess(value_range=(-1, 1), mean=(0.5,), std=(0.5,))
    with pytest.raises(ConfigError, match="std: every value must be positive"):
        Preprocess(value_range=None, mean=(0.5,), std=(0.0,))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"depth": 10**6}, "depth must be in the range 1 to 4,096, got 1,000,000"),
        ({"width": 2**17, "num_heads": 1}, "width must be in the range 1 to 65,536"),
        ({"mlp_dim": 10**4000}, "mlp_dim must be in the range .* a 4001-digit number"),
        ({"num_classes": 2**25}, "num_classes must be in the range 0 to 16,777,216"),
        ({"image_size": 16384}, "image_size must be in the range"),
        ({"norm_eps": float("nan")}, "norm_eps must be in"),
        ({"preprocess": "imagenet"}, "preprocess must be an object"),
        ({"image_size": 8192, "channels": 4096}, "values per image, more than 1,073,741,824"),
        ({"image_size": 4096, "patch_size": 2}, "tokens per image, more than 1,048,576"),
    ],
)
def test_sizes_are_bounded(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        dataclasses.replace(ViTConfig(), **kw)
    assert e.value.exit_code == 2


def test_bounds_hold_every_preset_and_far_bigger():
    big = ViTConfig.from_variant("vit-22b", width=4 * 6144, depth=8 * 48, mlp_dim=4 * 24576, num_heads=4 * 48, num_classes=10**6)
    assert big.depth == 384  # ViT-22B grown 4-8x in every direction is still a valid config


def test_hostile_json_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"model": ' * 50_000 + "{}" + "}" * 50_000)
    with pytest.raises(ConfigError, match=f"{f} nests JSON"):
        load_config(f)
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=f"{f} is not JSON"):
        load_config(f)
    f.write_text(json.dumps({"model": {**ViTConfig().to_dict(), "preprocess": {"value_range": [0, 1, 2]}}}))
    with pytest.raises(ConfigError, match=f"{f}: preprocess.value_range must be a list of 2 numbers"):
        load_config(f)


def test_demo_preset_is_the_demo_recipe_model():
    """vit22b-demo/4: the paper's block at D=64, L=4, F=256, N=4, patch 4, sized for 16-px digits (4x4 patches)."""
    cfg = ViTConfig.from_variant("vit22b-demo/4")
    assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.patch_size) == (64, 4, 256, 4, 4)
    assert (cfg.image_size, cfg.channels, cfg.num_classes, cfg.grid) == (16, 1, 10, 4)
    paper = PRESETS["vit22b-mu/16"]
    assert (cfg.block, cfg.qk_norm, cfg.qkv_bias, cfg.norm, cfg.norm_bias, cfg.pool) == (
        paper.block, paper.qk_norm, paper.qkv_bias, paper.norm, paper.norm_bias, paper.pool,
    )  # fmt: skip


def test_patch_grid_refuses_a_single_token():
    one = ViTConfig.from_variant("vit22b-mu/16", image_size=16)  # a valid config: checkpoints may hold one
    assert one.grid == 1
    with pytest.raises(ConfigError, match="cuts 16-px images into 1x1 patch of 16 px: one token") as e:
        one.check_patch_grid()
    assert "--model vit22b-demo/4" in e.value.hint and "--image-size 32 or more" in e.value.hint
    ViTConfig.from_variant("vit22b-mu/16", image_size=32).check_patch_grid()  # 2x2: something to attend to
    ViTConfig.from_variant("vit22b-demo/4").check_patch_grid()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"class_posemb": True, "pool": "gap"}, "class_posemb needs"),
        ({"class_posemb": True, "pool": "tok", "posemb": "sincos2d"}, "class_posemb needs"),
        ({"layer_scale": -1e-5}, "layer_scale must be"),
        ({"layer_scale": float("nan")}, "layer_scale must be"),
        ({"layer_scale": True}, "layer_scale must be"),
    ],
)
def test_public_family_options_are_checked(kw, words):
    with pytest.raises(ConfigError, match=words):
        ViTConfig(**kw)


def test_public_family_options_round_trip_through_json():
    cfg = ViTConfig(block="sequential", pool="tok", class_posemb=True, norm_pre=True, fc_norm=True, layer_scale=1e-5, norm_eps=1e-12)
    assert ViTConfig.from_json(cfg.to_json()) == cfg and cfg.posemb_len == cfg.num_patches + 1
