"""examples/ run: the QK-norm example's sweep, table and plot, on a few steps of a small model."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("optax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.parent.name + "_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qk_norm_example_sweeps_and_plots(tmp_path):
    """One setting (with QK-norm) of the sweep on a 1-layer model: the same code path as the README's sweep."""
    from PIL import Image

    qk = load(EXAMPLES / "qk_norm" / "run.py")
    small = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 1, "pool": "gap"}  # head dim K = 32
    runs = qk.sweep(tmp_path, [0.03], steps=4, model=small, qk_norms=(True,))
    (row,) = json.loads((tmp_path / "results.json").read_text())
    stats = [r for r in runs[0]["rows"] if "attn_logit_max" in r]
    assert (row["lr"], row["qk_norm"], row["steps"]) == (0.03, True, 4) and [r["step"] for r in stats] == [2, 4]
    assert row["max_attn_logit"] == max(max(r["attn_logit_max"]) for r in stats) and len(stats[-1]["attn_entropy"]) == 1
    assert 0 < row["final_min_entropy"] <= math.log(16) + 1e-5  # 16 tokens
    # With QK-norm, queries and keys are RMS-normalized: |q.k| / sqrt(K) <= sqrt(K) * max|q scale| * max|k scale|;
    # the scales start at 1 and move by less than 0.05 in the 3 updates before the last statistics (lr <= 0.03).
    assert row["max_attn_logit"] <= math.sqrt(32) * 1.05**2
    assert [r["rows"] for r in qk.load_runs(tmp_path)] == [r["rows"] for r in runs]
    png = qk.plot(runs, tmp_path / "qk.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0
        im.load()


def test_transfer_example_finetunes_and_plots(tmp_path):
    """The transfer example's path on a 1-layer model for a few steps: pretrain at 16 px, fine-tune
    with a new head at 24 px (position embedding resampled 4x4 -> 6x6) and train from scratch on a
    2-shot set; the fine-tuned run starts from the pretrained weights; results.json and the plot."""
    import numpy as np
    from PIL import Image

    from vitctl.config import load_config
    from vitctl.formats import layout
    from vitctl.posemb import resample_posemb

    tr = load(EXAMPLES / "transfer" / "run.py")
    small = {"width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2}
    results = tr.experiment(tmp_path, steps=4, pretrain_steps=4, seeds=[0], shots=[2], full=False, model=small)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    shot, full = tmp_path / "data" / "digits5-9-2shot-seed0", tmp_path / "data" / "digits5-9"
    assert sorted(p.parent.name for p in (shot / "train").glob("*/*.png")) == ["5", "5", "6", "6", "7", "7", "8", "8", "9", "9"]
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.glob("*/*.png")}
    assert files(shot / "test") == files(full / "test")  # one held-out set for every run of the task
    assert not set(files(full / "test").values()) & set(files(full / "train").values())
    runs = {(r["task"], r["start"]): r for r in results["runs"]}
    assert set(runs) == {("pretrain", "scratch"), ("2-shot", "pretrained"), ("2-shot", "scratch")}
    assert runs[("2-shot", "scratch")]["n_train"] == 10
    for r in runs.values():
        assert [s for s, _ in r["curve"]] == [1, 2, 3, 4] and all(0 <= a <= 1 for _, a in r["curve"])
    dirs = {
        "pre": tmp_path / "pretrain",
        "ft": tmp_path / "runs" / "2-shot-seed0-pretrained",
        "scratch": tmp_path / "runs" / "2-shot-seed0-scratch",
    }
    cfgs = {k: load_config(d) for k, d in dirs.items()}
    assert [(c.image_size, c.num_classes, c.width) for c in cfgs.values()] == [(16, 5, 32), (24, 5, 32), (24, 5, 32)]
    assert layout.read_provenance(dirs["ft"])["class_names"] == ["5", "6", "7", "8", "9"]
    w = {k: layout.load_jax(d, cfgs[k]) for k, d in dirs.items()}
    # 4 AdamW steps at lr <= 3e-3 move a weight by less than 0.05; two random initialisations differ by far more.
    kernel = "blocks/mlp_in/kernel"
    assert np.abs(w["ft"][kernel] - w["pre"][kernel]).max() < 0.05
    assert np.abs(w["scratch"][kernel] - w["pre"][kernel]).max() > 0.2
    grown = resample_posemb(w["pre"]["pos_embed"], (6, 6))
    assert w["ft"]["pos_embed"].shape == (1, 36, 32) and np.abs(w["ft"]["pos_embed"] - grown).max() < 0.05
    rows = {(r["task"], r["start"]): r for r in results["summary"]}
    assert rows[("2-shot", "pretrained")]["mean_final_accuracy"] == runs[("2-shot", "pretrained")]["curve"][-1][1]
    png = tr.plot(json.loads((tmp_path / "results.json").read_text()), tmp_path / "t.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 0
        im.load()
