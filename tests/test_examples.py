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
