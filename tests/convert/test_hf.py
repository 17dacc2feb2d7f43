"""Hugging Face transformers' ViT, read and written.

Read: `ViTForImageClassification` and `ViTModel` built by transformers (random weights), saved with
`save_pretrained`, converted with `vitctl convert torch-to-jax`, run on vitctl's torch and JAX
models: the logits (ViTModel: the normed class token) match transformers' to fp32 round-off.
Write: `--format hf` loads with `AutoModelForImageClassification.from_pretrained` with no missing or
unexpected key and the same logits; a parallel/QK-norm config is refused for hf and goes through
`--format timm`, which transformers loads as TimmWrapperForImageClassification, same logits.
"""

import json
import re

import numpy as np
import pytest

from tests.conftest import random_params, tiny, torch_model
from tests.convert.test_convert import assert_nothing_written
from tests.convert.test_timm_import import in_process, logits_of_both
from tests.hub import conftest as hub_conftest
from vitctl import checkpoint as ckpt
from vitctl.formats import layout
from vitctl.open import HF, open_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96, "image_size": 32, "patch_size": 8}
NAMES = [f"class {i}" for i in range(5)]
MODELS = {
    "classification": ("ViTForImageClassification", {"num_labels": 5, "id2label": dict(enumerate(NAMES))}),
    "classification-tanh-no-qkv-bias": ("ViTForImageClassification", {"num_labels": 3, "hidden_act": "gelu_new", "qkv_bias": False}),
    "model-with-pooler": ("ViTModel", {}),
}


@pytest.fixture
def cli(capsys):
    return in_process(capsys)


def hf_dir(path, cls, extra, edit=None, preprocessor=None, seed=0):
    """A transformers ViT of class `cls`, nudged off its init (no zero bias), saved by save_pretrained;
    `edit` changes config.json afterwards (hostile inputs)."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(transformers.ViTConfig(**SMALL, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if edit:
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config))
    if preprocessor:
        (path / layout.PREPROCESSOR).write_text(json.dumps(preprocessor))
    return model


def images(seed=1, n=3, size=32):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32))


@pytest.mark.parametrize("case", MODELS)
def test_hf_model_reads_into_both_models(cli, tmp_path, case):
    cls, extra = MODELS[case]
    model = hf_dir(tmp_path / "hf", cls, extra)
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "hf", tmp_path / "jax")
    assert code == 0, err
    x = images()
    with torch.no_grad():
        out = model(pixel_values=x)
    # ViTModel: vitctl's model without a head gives the normed class token (HF's pooler is left out, with a note)
    reference = (out.logits if cls == "ViTForImageClassification" else out.last_hidden_state[:, 0]).numpy()
    cfg, ours, theirs = logits_of_both(tmp_path / "jax", x)
    scale = np.abs(reference).max()
    print(f"{case}: max-abs torch {np.abs(ours - reference).max():.2e}, jax {np.abs(theirs - reference).max():.2e}, scale {scale:.2f}")
    assert reference.shape == ours.shape == theirs.shape and scale > 0.1
    assert np.abs(ours - reference).max() < 1e-5 * max(1.0, scale)
    assert np.abs(theirs - reference).max() < 1e-5 * max(1.0, scale)
    assert cfg.norm_eps == 1e-12 and cfg.class_posemb and cfg.gelu_approximate == (extra.get("hidden_act") == "gelu_new")
    if cls == "ViTModel":
        assert "pooler" in err and "not part of vitctl's model" in err


def test_format_class_names_and_preprocessing(cli, tmp_path):
    pre = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "resample": 3}
    hf_dir(tmp_path / "hf", "ViTForImageClassification", MODELS["classification"][1], preprocessor=pre)
    with open_checkpoint(tmp_path / "hf") as ck:
        assert ck.format == HF and ck.backend == "torch" and ck.provenance["class_names"] == NAMES
        assert (ck.cfg.preprocess.mean, ck.cfg.preprocess.std, ck.cfg.preprocess.resize) == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "bicubic")
    code, out, err = cli("info", tmp_path / "hf", "--json")
    assert code == 0 and json.loads(out)["formats"] == [HF], err


def jax_checkpoint(path, cfg, params, provenance=None):
    path.mkdir()
    layout.save_jax(path, params)
    ckpt.write_config(path, cfg, provenance or {"source_format": "test"})


CLASSIC = {
    "block": "sequential",
    "qk_norm": False,
    "qkv_bias": True,
    "norm": "layernorm",
    "norm_bias": True,
    "pool": "tok",
    "class_posemb": True,
}


@pytest.mark.parametrize("overrides", [{"norm_eps": 1e-12}, {"gelu_approximate": True, "num_classes": 4}])
def test_export_loads_strictly_in_transformers(cli, tmp_path, overrides):
    cfg = tiny(**CLASSIC, **overrides)
    params = random_params(cfg)
    names = [f"n{i}" for i in range(cfg.num_classes)]
    jax_checkpoint(tmp_path / "jax", cfg, params, {"source_format": "test", "class_names": names})
    code, _, err = cli("convert", "jax-to-torch", tmp_path / "jax", tmp_path / "hf", "--format", "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / layout.PREPROCESSOR).is_file()
    model, info = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == "ViTForImageClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert [model.config.id2label[i] for i in range(cfg.num_classes)] == names
    x = images(size=16)
    with torch.no_grad():
        theirs = model.eval()(pixel_values=x).logits.numpy()
        ours = torch_model(cfg, params)(x)[0].numpy()
    print(f"hf export {overrides}: max-abs {np.abs(theirs - ours).max():.2e}, scale {np.abs(ours).max():.2f}")
    assert np.abs(theirs - ours).max() < 1e-5 * max(1.0, np.abs(ours).max())
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.size == {"height": 16, "width": 16} and list(processor.image_mean) == [0.5] * 3  # value_range [-1, 1]


def test_parallel_config_goes_through_timm_into_transformers(cli, tmp_path):
    """HF's ViT class cannot express the paper's block: refused by name, with the hint to use timm;
    the timm export loads in transformers through TimmWrapper and computes the same logits."""
    cfg = tiny(norm_pre=True, layer_scale=0.1, pool="tok")  # parallel, QK-norm, RmsNorm, MAP-less
    params = random_params(cfg)
    params["blocks/ls_mlp/scale"] = params["blocks/ls_attn/scale"]  # timm's parallel block has one layer scale
    jax_checkpoint(tmp_path / "jax", cfg, params)
    code, _, err = cli("convert", "jax-to-torch", tmp_path / "jax", tmp_path / "hf", "--format", "hf")
    assert code == 2 and "block 'parallel'" in err and "qk_norm True" in err and "--format timm" in err, err
    assert_nothing_written(tmp_path / "hf")
    assert cli("convert", "jax-to-torch", tmp_path / "jax", tmp_path / "timm", "--format", "timm")[0] == 0
    model, info = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "timm", output_loading_info=True)
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x = images(size=16)
    with torch.no_grad():
        theirs = model.eval()(pixel_values=x).logits.numpy()
        ours = torch_model(cfg, params)(x)[0].numpy()
    print(f"timm export via TimmWrapper: max-abs {np.abs(theirs - ours).max():.2e}, scale {np.abs(ours).max():.2f}")
    assert np.abs(theirs - ours).max() < 1e-5 * max(1.0, np.abs(ours).max())


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _tensors(edit):
    """Edits the saved tensors of an HF dir."""

    def apply(path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    return apply


HOSTILE = {
    "unknown hidden_act": ({"edit": _set("hidden_act", "quick_gelu")}, "hidden_act 'quick_gelu'"),
    "config lies about width": ({"edit": _set("hidden_size", 128)}, "does not match the model config"),
    "config lies about depth": ({"edit": _set("num_hidden_layers", 3)}, "missing"),
    "non-square image": ({"edit": _set("image_size", [32, 16])}, "not square"),
    "huge depth": ({"edit": _set("num_hidden_layers", 10**9)}, "depth must be in the range"),
    "missing tensor": ({"after": _tensors(lambda t: t.pop("vit.layernorm.bias"))}, "missing 1: vit.layernorm.bias"),
    "extra tensor": ({"after": _tensors(lambda t: t.update({"vit.embeddings.mask_token": torch.zeros(1, 1, 64)}))}, "unexpected 1"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_refused_by_name_and_nothing_written(cli, tmp_path, case):
    spec, message = HOSTILE[case]
    hf_dir(tmp_path / "hf", "ViTForImageClassification", {"num_labels": 5}, edit=spec.get("edit"))
    if "after" in spec:
        spec["after"](tmp_path / "hf")
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "hf", tmp_path / "jax")
    assert code in (1, 2) and "Error:" in err and "Traceback" not in err, err
    assert re.search(message, err), err
    assert_nothing_written(tmp_path / "jax")


hub = hub_conftest.hub  # the loopback Hub server and the CLI run against it (tests/hub/conftest.py)
vitctl = hub_conftest.vitctl


def test_hf_uri_fetches_config_weights_and_preprocessor(hub, vitctl, tmp_path):
    """`vitctl convert torch-to-jax hf://org/name` on a transformers ViT repo: config.json, model.safetensors
    and preprocessor_config.json come through the hub resolver (the preprocessing is the repo's)."""
    pre = {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "resample": 3}
    hf_dir(tmp_path / "hf", "ViTForImageClassification", {"num_labels": 5}, preprocessor=pre)
    sha = hub.seed("google/tiny-vit", hub_conftest.repo_files(tmp_path / "hf"))
    r = vitctl("convert", "torch-to-jax", f"hf://google/tiny-vit@{sha}", tmp_path / "jax", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source_format"] == HF
    with open_checkpoint(tmp_path / "jax") as ck:
        assert ck.cfg.preprocess.mean == (0.4, 0.5, 0.6) and ck.cfg.preprocess.resize == "bicubic"
        assert ck.provenance["source"].startswith("hf://google/tiny-vit")


def test_verify_an_hf_dir_against_its_conversion(cli, tmp_path):
    hf_dir(tmp_path / "hf", "ViTModel", {})
    assert cli("convert", "torch-to-jax", tmp_path / "hf", tmp_path / "jax")[0] == 0
    code, out, err = cli("verify", tmp_path / "hf", tmp_path / "jax", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["passed"] and report["a"]["format"] == HF and report["a"]["backend"] == "torch"
