"""Foreign timm checkpoints as a source: timm's own models, saved in timm's Hub layout, read by vitctl.

Each model is built by timm itself (random weights, nudged off their init so that no bias is zero),
saved with timm's `save_for_hf` (config.json + model.safetensors), converted with
`vitctl convert torch-to-jax`, and run on both of vitctl's models: the logits match timm's to fp32
round-off. Hostile or inexpressible inputs are refused by name, exit 1 or 2, and leave nothing.
"""

import json
import re

import numpy as np
import pytest

from tests.conftest import jax_model, torch_model
from tests.convert.test_convert import assert_nothing_written
from vitctl.open import TIMM, open_checkpoint
from vitctl.params import stack

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 5}
MODELS = {
    "classic": ("vit_base_patch16_224", {}),
    "xp-layer-scale": ("vit_base_patch16_xp_224", {"init_values": 0.3}),
    "classic-avg-fc-norm-pre-norm-qk-norm": (
        "vit_base_patch16_224",
        {"class_token": False, "global_pool": "avg", "pre_norm": True, "qk_norm": True, "init_values": 0.5, "act_layer": "gelu_tanh"},
    ),
    "classic-map-no-embed-class": ("vit_base_patch16_224", {"class_token": False, "global_pool": "map", "no_embed_class": True}),
    "xp-no-classes": ("vit_base_patch16_xp_224", {"num_classes": 0, "num_heads": 2}),
}


@pytest.fixture
def cli(capsys):
    return in_process(capsys)


def in_process(capsys):
    """`main()` in-process: (exit code, stdout, stderr), as the console script would give them."""
    from vitctl.cli import main

    def call(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        return (e.value.code, *capsys.readouterr())

    return call


def timm_dir(path, name, args, seed=0, hub_edit=None, tensors_edit=None):
    """A timm model of `name` built by timm, nudged off its init, saved by timm (save_for_hf).
    hub_edit / tensors_edit: change config.json / the tensors after saving (hostile inputs)."""
    from safetensors.torch import load_file, save_file
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_for_hf(model, path, model_args=args, safe_serialization=True)
    if hub_edit:
        hub = json.loads((path / "config.json").read_text())
        hub_edit(hub)
        (path / "config.json").write_text(json.dumps(hub))
    if tensors_edit:
        tensors = load_file(path / "model.safetensors")
        tensors_edit(tensors)
        save_file(tensors, path / "model.safetensors")
    return model


def logits_of_both(ckpt_dir, x):
    """vitctl's torch and JAX models holding the converted checkpoint, run on x (NCHW)."""
    with open_checkpoint(ckpt_dir) as ck:
        cfg, params = ck.cfg, stack(ck.params(), ck.cfg.depth)
    with torch.no_grad():
        ours = torch_model(cfg, params)(x)[0].numpy()
    theirs = np.asarray(jax_model(cfg, params)(x.numpy().transpose(0, 2, 3, 1))[0])
    return cfg, ours, theirs


@pytest.mark.parametrize("case", MODELS)
def test_timm_model_reads_into_both_models(cli, tmp_path, case):
    name, extra = MODELS[case]
    args = {**SMALL, **extra}
    model = timm_dir(tmp_path / "timm", name, args)
    with open_checkpoint(tmp_path / "timm") as ck:
        assert ck.format == TIMM and ck.cfg.width == 64 and ck.cfg.depth == 2
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "timm", tmp_path / "jax")
    assert code == 0, err
    assert "note: timm" in err  # the reading's assumptions are said, not silent
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        reference = model(x).numpy()
    _, ours, theirs = logits_of_both(tmp_path / "jax", x)
    scale = np.abs(reference).max()
    print(f"{case}: max-abs torch {np.abs(ours - reference).max():.2e}, jax {np.abs(theirs - reference).max():.2e}, scale {scale:.2f}")
    assert reference.shape == ours.shape == theirs.shape and scale > 0.1
    assert np.abs(ours - reference).max() < 1e-5 * max(1.0, scale)
    assert np.abs(theirs - reference).max() < 1e-5 * max(1.0, scale)


def test_info_and_class_names_of_a_timm_dir(cli, tmp_path):
    names = [f"kind {i}" for i in range(5)]
    timm_dir(tmp_path / "timm", "vit_base_patch16_224", SMALL, hub_edit=lambda h: h.update(label_names=names))
    code, out, err = cli("info", tmp_path / "timm", "--json")
    assert code == 0, err
    assert json.loads(out)["formats"] == [TIMM]
    with open_checkpoint(tmp_path / "timm") as ck:
        assert ck.provenance["class_names"] == names and ck.cfg.class_posemb and ck.cfg.norm_eps == 1e-6
        assert ck.cfg.preprocess.mean == (0.5, 0.5, 0.5)  # vit_base_patch16_224's pretrained_cfg (Inception mean/std)


def _drop(name):
    return lambda t: t.pop(name)


def _set(key, value):
    return lambda h: h["model_args"].__setitem__(key, value)


HOSTILE = {
    "unknown architecture": ({"hub_edit": lambda h: h.update(architecture="resnet50")}, "resnet50"),
    "unknown model_args key": ({"hub_edit": _set("block_fn", "Block")}, "block_fn"),
    "register tokens": ({"args": {"reg_tokens": 4}}, "reg_tokens"),
    "quick_gelu": ({"args": {"act_layer": "quick_gelu"}}, "quick_gelu"),
    "class token with avg pool": ({"args": {"global_pool": "avg"}}, "a class token with global_pool 'avg'"),
    "no final norm": ({"args": {"final_norm": False}}, "final_norm"),
    "another norm": ({"hub_edit": _set("norm_layer", "groupnorm")}, "norm_layer 'groupnorm'"),
    "no position embedding": ({"args": {"pos_embed": "none"}}, "pos_embed 'none'"),
    "dynamic image size": ({"args": {"dynamic_img_size": True}}, "dynamic_img_size"),
    "config lies about width": ({"hub_edit": _set("embed_dim", 128)}, "width 128 \\(the tensors: 64\\)"),
    "config lies about classes": ({"hub_edit": _set("num_classes", 7)}, "num_classes 7 \\(the tensors: 5\\)"),
    "missing tensor": ({"tensors_edit": _drop("blocks.1.attn.proj.bias")}, "missing 1: blocks.1.attn.proj.bias"),
    "extra tensor": ({"tensors_edit": lambda t: t.update(extra=torch.zeros(3))}, "unexpected 1: extra"),
    "wrong shape": ({"tensors_edit": lambda t: t.update({"norm.weight": torch.ones(63)})}, "'norm.weight' has shape \\(63,\\)"),
    "hostile num_heads": ({"hub_edit": _set("num_heads", [4])}, "num_heads"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_refused_by_name_and_nothing_written(cli, tmp_path, case):
    spec, message = HOSTILE[case]
    args = {**SMALL, **spec.get("args", {})}
    timm_dir(tmp_path / "timm", "vit_base_patch16_224", args, hub_edit=spec.get("hub_edit"), tensors_edit=spec.get("tensors_edit"))
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "timm", tmp_path / "jax")
    assert code in (1, 2) and "Error:" in err and "Traceback" not in err, err
    assert re.search(message, err), err
    assert_nothing_written(tmp_path / "jax")


def test_a_bias_vitctl_lacks_must_be_zero(cli, tmp_path):
    """An _xp_ model with a MAP head: timm's attention pool always has q/kv biases, vitctl's (qkv_bias
    off) has none. Zero, they read (the same function); trained, they are refused by name."""
    args = {**SMALL, "class_token": False, "global_pool": "map"}

    def zero(t):
        for n in ("attn_pool.q.bias", "attn_pool.kv.bias"):
            t[n] = torch.zeros_like(t[n])

    timm_dir(tmp_path / "zero", "vit_base_patch16_xp_224", args, tensors_edit=zero)
    assert cli("convert", "torch-to-jax", tmp_path / "zero", tmp_path / "ok")[0] == 0
    timm_dir(tmp_path / "trained", "vit_base_patch16_xp_224", args)
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "trained", tmp_path / "jax")
    assert code == 1 and "attn_pool.q.bias" in err and "must hold zeros" in err, err
    assert_nothing_written(tmp_path / "jax")


def test_vitctl_export_with_the_new_options_reads_back_exactly(cli, tmp_path):
    """class_posemb, norm_pre (its patch bias folded into pos_embed), fc_norm and layer_scale go out to
    timm and back: timm computes vitctl's function, and the read-back checkpoint computes it too."""
    from tests.conftest import random_params, tiny
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout

    cfg = tiny(block="sequential", qk_norm=False, qkv_bias=True, norm="layernorm", norm_bias=True, pool="tok", class_posemb=True,
               norm_pre=True, fc_norm=True, layer_scale=0.1)  # fmt: skip
    params = random_params(cfg)
    (tmp_path / "jax").mkdir()
    layout.save_jax(tmp_path / "jax", params)
    ckpt.write_config(tmp_path / "jax", cfg, {"source_format": "test"})
    assert cli("convert", "jax-to-torch", tmp_path / "jax", tmp_path / "timm", "--format", "timm")[0] == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert cli("convert", "torch-to-jax", tmp_path / "timm", tmp_path / "back")[0] == 0
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        want = torch_model(cfg, params)(x)[0].numpy()
        got_timm = model(x).numpy()
    _, got, got_jax = logits_of_both(tmp_path / "back", x)
    for other in (got_timm, got, got_jax):
        assert np.abs(other - want).max() < 1e-5 * max(1.0, np.abs(want).max())


def test_verify_runs_timm_itself_on_a_timm_dir(cli, tmp_path):
    """`vitctl verify TIMM_DIR JAX_DIR`: timm's own model (pre_norm, layer scale) against vitctl's JAX
    model, every intermediate compared (the embedding after timm's norm_pre, as vitctl's)."""
    timm_dir(tmp_path / "timm", "vit_base_patch16_xp_224", {**SMALL, "init_values": 0.3})
    assert cli("convert", "torch-to-jax", tmp_path / "timm", tmp_path / "jax")[0] == 0
    code, out, err = cli("verify", tmp_path / "timm", tmp_path / "jax", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["passed"] and report["a"]["format"] == TIMM and report["a"]["backend"] == "timm"


def test_the_name_table_agrees_with_timms_registry():
    """Every registered timm name the table covers, built by timm on the meta device (no memory): the
    config read from the bare name and the model's shapes expects exactly timm's state_dict."""
    from vitctl.convert import timm as vt
    from vitctl.convert import timm_import

    names = [n for n in timm.list_models("vit_*") if timm_import.ARCHITECTURE.fullmatch(n)]
    assert {"vit_base_patch16_224", "vit_gigantic_patch14_224", "vit_base_patch16_xp_224", "vit_huge_patch14_xp_224"} <= set(names)
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        cfg, _ = timm_import.timm_config({"architecture": name}, shapes)
        assert vt.timm_param_shapes(cfg) == shapes, name
        assert cfg.block == ("parallel" if type(model.blocks[0]).__name__ == "ParallelScalingBlock" else "sequential"), name
        assert (cfg.num_heads, cfg.norm_pre, cfg.class_posemb) == (
            model.blocks[0].attn.num_heads if cfg.block == "sequential" else model.blocks[0].num_heads,
            not isinstance(model.norm_pre, torch.nn.Identity),
            not model.no_embed_class,
        ), name
