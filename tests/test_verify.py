"""vitctl verify: passes a clean conversion, names the first divergent layer, diagnoses
conventions, judges bf16 by its preset, and reports (not crashes on) broken pairs."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

from tests.conftest import random_params, tiny  # noqa: E402
from vitctl import checkpoint as ckpt  # noqa: E402
from vitctl.cli import main  # noqa: E402
from vitctl.convert import io  # noqa: E402
from vitctl.convert.convert import convert  # noqa: E402
from vitctl.convert.mapping import jax_to_torch  # noqa: E402
from vitctl.verify import PRESETS, verify  # noqa: E402


def make_pair(tmp_path, cfg=None, seed=0):
    """A JAX checkpoint of random weights and its conversion to torch."""
    cfg = cfg or tiny()
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    jax_dir.mkdir()
    ckpt.write_config(jax_dir, cfg, {"created_by": "test"})
    ckpt.save_jax(jax_dir, random_params(cfg, seed))
    convert(jax_dir, torch_dir, "jax-to-torch")
    return jax_dir, torch_dir


def write_torch(path, cfg, state):
    path.mkdir()
    ckpt.write_config(path, cfg, {"created_by": "test"})
    ckpt.save_torch(path, state)
    return path


def cli(*args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def test_clean_conversion_passes(pair, capsys):
    code, out, _ = cli("verify", *pair, "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 0 and r["passed"] and r["first_divergent"] is None
    assert r["max_abs"] < 1e-5 and r["tolerance"] == 1e-5
    assert [x["name"] for x in r["layers"]] == ["patch_embed", "embed", "block00", "block01", "encoded", "pre_logits", "logits"]
    assert all(x["cosine"] > 0.999999 for x in r["layers"])
    assert r["weights"]["compared"] == r["weights"]["exactly_equal"] == 41
    assert r["top1"] == 1.0 and r["settings"]["jax_default_matmul_precision"] == "highest" and r["settings"]["torch_allow_tf32"] is False
    assert not r["config_diff"]


def test_table_output_and_report_file(pair, tmp_path, capsys):
    code, out, _ = cli("verify", *pair, "--report", tmp_path / "r.json", capsys=capsys)
    assert code == 0 and "PASSED" in out and "block01" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


def test_one_perturbed_block_is_named(pair, tmp_path, capsys):
    cfg = tiny()
    state = io.SafetensorsReader(pair[1])
    sd = {n: state.read(n) for n in state.infos()}
    sd["blocks.1.mlp_in.weight"] = sd["blocks.1.mlp_in.weight"] + np.float32(1e-3)
    bad = write_torch(tmp_path / "bad", cfg, sd)
    code, out, _ = cli("verify", pair[0], bad, "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 1 and not r["passed"]
    assert r["first_divergent"] == "block01"
    assert [x["passed"] for x in r["layers"][:3]] == [True, True, True]  # patch_embed, embed, block00
    assert r["weights"]["max_abs_tensor"] == "blocks/1/mlp_in/kernel"
    assert r["weights"]["exactly_equal"] == 40


def test_diagnose_names_gelu(pair, tmp_path, capsys):
    cfg = tiny()
    reader = io.SafetensorsReader(pair[1])
    sd = {n: reader.read(n) for n in reader.infos()}
    wrong = write_torch(tmp_path / "gelu", tiny(gelu_approximate=True), sd)  # same weights, tanh GELU
    code, out, _ = cli("verify", pair[0], wrong, "--diagnose", "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 1 and r["config_diff"] == [{"field": "gelu_approximate", "a": False, "b": True}]
    passing = [d["flip"] for d in r["diagnosis"] if d["passed"]]
    assert passing == ["GELU exact (erf)"], r["diagnosis"]
    assert cfg.gelu_approximate is False


def test_diagnose_names_a_transposed_qkv_layout(pair, tmp_path, capsys):
    cfg = tiny()
    params = random_params(cfg, 0)
    for name in [n for n in params if n.endswith(("/q/kernel", "/k/kernel", "/v/kernel"))]:
        w = params[name]  # a converter that read (D, N*K) as (D, K, N): blocks (L, D, N, K), map head (D, N, K)
        *lead, D, N, K = w.shape
        params[name] = np.swapaxes(w.reshape(*lead, D, K, N), -1, -2).copy()
    wrong = write_torch(tmp_path / "qkv", cfg, jax_to_torch(params, cfg))
    r = verify(pair[0], wrong, run_diagnose=True)
    assert not r["passed"] and r["first_divergent"] == "block00"
    assert [d["flip"] for d in r["diagnosis"] if d["passed"]] == ["QKV kernels with heads and head_dim transposed"]


def test_bf16_copy_passes_the_bf16_preset_only(pair, tmp_path, capsys):
    bf16 = tmp_path / "bf16"
    convert(pair[0], bf16, "jax-to-torch", dtype="bfloat16")
    r = verify(pair[0], bf16, precision="bf16")
    assert r["passed"], r["layers"]
    assert r["tolerance"] == PRESETS["bf16"].atol and r["settings"]["precision"] == "bf16"
    assert r["weights"]["exactly_equal"] < r["weights"]["compared"]
    strict = verify(pair[0], bf16, precision="fp32")
    assert not strict["passed"] and strict["max_abs"] > 1e-5
    code, _, _ = cli("verify", pair[0], bf16, "--tolerance", "1e-5", "--precision", "bf16", capsys=capsys)
    assert code == 1


def test_mismatched_configs_report_and_exit_1(pair, tmp_path, capsys):
    other, _ = make_pair(tmp_path, tiny(depth=3, num_classes=7), seed=1)
    code, out, err = cli("verify", pair[0], other, "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 1 and not r["passed"] and "Traceback" not in err
    assert {d["field"] for d in r["config_diff"]} == {"depth", "num_classes"}
    assert "blocks/2/q/kernel" in r["weights"]["only_in_b"]
    assert any("logits" in p for p in r["problems"])


def test_missing_tensor_reports_and_exits_1(pair, tmp_path, capsys):
    reader = io.SafetensorsReader(pair[1])
    sd = {n: reader.read(n) for n in reader.infos() if n != "blocks.0.k.weight"}
    broken = write_torch(tmp_path / "missing", tiny(), sd)
    code, out, err = cli("verify", pair[0], broken, "--json", capsys=capsys)
    r = json.loads(out)
    assert code == 1 and not r["passed"] and "blocks.0.k.weight" in r["problems"][0]
    assert "Traceback" not in err


def test_timm_export_and_big_vision_sides(pair, tmp_path, capsys):
    pytest.importorskip("timm")
    timm_dir = tmp_path / "timm"
    convert(pair[0], timm_dir, "jax-to-torch", target_format="timm")
    r = verify(pair[1], timm_dir)
    assert r["passed"] and r["b"]["backend"] == "timm", r["layers"]
    assert r["weights"]["exactly_equal"] == r["weights"]["compared"]


def test_usage_errors_exit_2(pair, tmp_path, capsys):
    code, _, err = cli("verify", pair[0], tmp_path / "nope", capsys=capsys)
    assert code == 2 and "Error:" in err
    code, _, err = cli("verify", pair[0], pair[1], "--batch", "0", capsys=capsys)
    assert code == 2


def test_images_go_through_each_sides_preprocessing(pair, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i, size in enumerate((16, 40, 23)):  # one at the model size, two resized
        Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    r = verify(pair[0], pair[1], images=tmp_path / "imgs", batch=1)
    assert r["passed"] and r["inputs"]["image_files"] == ["0.png", "1.png", "2.png"]
    assert sys.modules.get("PIL") is not None
