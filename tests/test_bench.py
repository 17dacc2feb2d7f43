"""vitctl.bench and `vitctl bench`: the FLOPs count, the rows' arithmetic, the table and JSON,
and the path without timm. Runs the benchmark's "tiny" mode (2-layer width-32 models, one
round, no waiting); never asserts on the measured times."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import cli  # noqa: F401  (the in-process CLI fixture)
from vitctl import bench
from vitctl.config import ViTConfig
from vitctl.params import random_weights


# ----------------------------------------------------------------------------- FLOPs
def test_flops_b16_hand_count():
    # B/16 at 224 px: Np = 196 patches, T = 197 tokens (class token), D = 768, F = 3072, 12 layers.
    patch = 196 * (16 * 16 * 3) * 768  # 115,605,504 MACs
    block = 197 * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * 197 * 197 * 768  # 1,453,954,560 MACs
    head = 768 * 1000
    assert patch + 12 * block + head == 17_563_828_224  # the ~17.6 GMACs usually quoted for ViT-B/16
    cfg = ViTConfig.from_variant("B/16")
    assert bench.flops(cfg) == 2 * 17_563_828_224
    assert bench.flops(cfg, 8) == 8 * bench.flops(cfg)
    assert bench.flops(cfg, 8, train=True) == 3 * bench.flops(cfg, 8)
    # The parallel block does the same matmuls; the MAP head adds its own.
    assert bench.flops(ViTConfig.from_variant("vit22b-B/16", pool="tok")) == bench.flops(cfg)
    assert bench.flops(ViTConfig.from_variant("vit22b-B/16")) > bench.flops(cfg)


_SIG = re.compile(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")


def _dims(t: str) -> list[int]:  # "tensor<2x17x48xf32>" -> [2, 17, 48]
    return [int(d) for d in t[len("tensor<") : -1].split("x")[:-1]]


def _matmul_flops(stablehlo: str) -> int:
    """2 x MACs of every dot_general and convolution in a StableHLO module (no loops in it)."""
    total = 0
    for line in stablehlo.splitlines():
        if "stablehlo.dot_general" in line:
            lhs, _, out = map(_dims, _SIG.search(line).groups())
            contracting = re.search(r"contracting_dims = \[([\d, ]*)\] x", line).group(1)
            total += 2 * math.prod(out) * math.prod(lhs[int(i)] for i in contracting.split(","))
        elif "stablehlo.convolution" in line:
            _, kernel, out = map(_dims, _SIG.search(line).groups())
            total += 2 * math.prod(out) * math.prod(kernel) // out[-1]  # NHWC output, HWIO kernel
    return total


def test_flops_match_the_compiled_program():
    """flops() equals the matmul FLOPs of the lowered JAX forward (parallel block, MAP head). (The
    gradient's matmuls, lowered the same way, are 3x the forward less the patch embedding's input
    gradient, which nobody asks for: checked by hand, left out here for CI time.)"""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from flax import nnx

    from vitctl.model_jax.model import abstract_model

    cfg = ViTConfig.from_variant(
        "vit22b-mu/16", width=48, depth=2, mlp_dim=80, num_heads=3, patch_size=8, image_size=32, num_classes=10, scan_layers=False
    )
    graphdef, state = nnx.split(abstract_model(cfg))  # shapes only: lowering needs no values
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def logits(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    assert _matmul_flops(jax.jit(logits).lower(state, x).as_text()) == bench.flops(cfg, 2)


# ----------------------------------------------------------------------------- rows
def test_link_fills_ratios_from_the_named_baseline():
    rows = bench.link(
        [
            bench.Row("a ours", 6.0, "images/s", "a theirs"),
            bench.Row("a theirs", 4.0, "images/s"),
            bench.Row("b ours", 3.0, "images/s", "b theirs"),
            bench.Row("b theirs", None, "images/s", note=bench.TIMM_MISSING),
            bench.Row("c", 1.0, "s", "no such row"),
        ]
    )
    assert [r.ratio for r in rows] == [1.5, None, None, None, None]
    assert bench.short_baseline(rows[0]) == "theirs"
    assert bench.short_baseline(bench.Row("GEMM x", 1.0, "", "cp")) == "cp"
    assert rows[3].as_dict() == {
        "name": "b theirs",
        "value": None,
        "unit": "images/s",
        "baseline": None,
        "ratio": None,
        "note": "timm not installed",
    }
    assert bench.Row("x", 0.000123456789, "GB/s").as_dict()["value"] == 0.000123457  # 6 significant digits


def _check_rows(rows: list[dict]) -> dict[str, dict]:
    """Every row has the schema's keys; names are unique; ratio = value / the baseline row's value."""
    by_name = {r["name"]: r for r in rows}
    assert len(by_name) == len(rows)
    for r in rows:
        assert {"name", "value", "unit", "baseline", "ratio"} <= set(r)
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        if base is None or r["value"] is None or base["value"] is None:
            assert r["ratio"] is None, r
        else:
            assert r["ratio"] == pytest.approx(r["value"] / base["value"], rel=1e-3, abs=1e-4), r
    return by_name


@pytest.fixture(scope="module")
def tiny_report():
    """Every part of the benchmark, once, at the tiny size."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("timm")
    return bench.run("tiny")


def test_tiny_run_rows(tiny_report):
    rows = _check_rows(tiny_report.as_dict()["rows"])
    for name in ("GEMM torch fp32 (MKL)", "GEMM torch bf16", "GEMM XLA fp32", "GEMM XLA bf16"):
        assert rows[name]["unit"] == "GFLOP/s" and rows[name]["value"] > 0
    for config in ("classic", "parallel"):
        for b in (1, 2):
            ours, timm = rows[f"forward {config} tiny fp32 b{b} vitctl-torch"], rows[f"forward {config} tiny fp32 b{b} timm"]
            assert ours["baseline"] == timm["name"] and ours["unit"] == "images/s" and timm["value"] > 0
        assert f"forward {config} tiny bf16 b1 vitctl-torch" in rows
    train = rows["train parallel tiny fp32 b2 vitctl-torch"]
    assert train["baseline"] == "train parallel tiny fp32 b2 timm+AdamW" and train["ratio"] > 0
    assert rows["convert jax-to-torch parallel tiny"]["baseline"] == "cp -r (same bytes)"
    for cmd in ("info", "plan"):
        assert rows[f"vitctl {cmd} vit-22b time"]["baseline"] == "vitctl --help time"
        assert rows[f"vitctl {cmd} vit-22b peak RSS"]["unit"] == "MiB"
        assert rows[f"vitctl {cmd} vit-22b peak RSS"]["value"] > 1  # the child's own, measured
    assert tiny_report.load["quiet_gate"]["calls"] > 0


def test_tiny_run_table(tiny_report):
    from rich.console import Console

    console = Console(width=250, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(bench.rows_table("t", tiny_report.rows))
    text = console.export_text()
    for r in tiny_report.rows:
        assert r.name in text
    assert "forward classic tiny fp32 b2 vitctl-torch" in text and "timm" in text


def test_tiny_run_jax_rows(tiny_report):
    """vitctl-jax forward and train step: images/s against timm, GFLOP/s against the best fp32 GEMM row."""
    rows = _check_rows(tiny_report.as_dict()["rows"])
    peak = max((r for r in rows.values() if r["name"].startswith("GEMM") and "fp32" in r["name"]), key=lambda r: r["value"])
    for name in ("forward classic tiny fp32 b2", "forward parallel tiny fp32 b2", "train parallel tiny fp32 b2"):
        assert rows[f"{name} vitctl-jax GFLOP/s"]["baseline"] == peak["name"]
    for config in ("classic", "parallel"):  # forward: against the plain Flax model, which is against timm
        name = f"forward {config} tiny fp32 b2"
        assert rows[f"{name} vitctl-jax"]["baseline"] == f"{name} plain-flax" and rows[f"{name} vitctl-jax"]["ratio"] > 0
        assert rows[f"{name} plain-flax"]["baseline"] == f"{name} timm" and rows[f"{name} plain-flax"]["value"] > 0
    assert rows["train parallel tiny fp32 b2 vitctl-jax"]["baseline"] == "train parallel tiny fp32 b2 timm+AdamW"
    # The GFLOP/s row is the analytic FLOPs at the measured rate: images/s x FLOPs per image.
    cfg = bench.MODES["tiny"].configs()["parallel"]
    per_image = bench.flops(cfg, 1, train=True) / 1e9
    train = "train parallel tiny fp32 b2 vitctl-jax"
    assert rows[f"{train} GFLOP/s"]["value"] == pytest.approx(rows[train]["value"] * per_image, rel=1e-3)


_SMALL = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 8, "image_size": 32, "num_classes": 10}


@pytest.mark.parametrize(
    "variant, extra",
    [("mu/16", {}), ("vit22b-mu/16", {"posemb": "sincos2d"})],  # classic; parallel + QK-norm + MAP head (tok: the tiny run)
    ids=["classic", "parallel-map"],
)
def test_plain_flax_baseline_computes_vitctl_jax_function(variant, extra):
    """The plain Flax baseline, loaded with vitctl-jax's weights, gives vitctl-jax's logits: the
    benchmark compares two implementations of one function, not two functions."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import load_flat_params

    cfg = ViTConfig.from_variant(variant, **_SMALL, **extra)
    flat = random_weights(cfg)
    ours = abstract_model(cfg)
    load_flat_params(ours, flat)
    plain = bench.plain_flax().plain_flax_model(cfg, flat)  # bench/plain_flax.py of this checkout
    assert len(plain.blocks) == cfg.depth and isinstance(plain.patch_embed, nnx.Conv)  # the straightforward form
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    (g1, s1), (g2, s2) = nnx.split(plain), nnx.split(ours)
    theirs = jax.jit(lambda s, x: nnx.merge(g1, s)(x))(s1, x)
    logits = jax.jit(lambda s, x: nnx.merge(g2, s)(x)[0])(s2, x)
    assert theirs.shape == (2, 10) and float(jnp.abs(logits).max()) > 0.5  # non-trivial logits
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(logits), rtol=0, atol=1e-5)


def test_plain_flax_baseline_found_only_in_a_checkout(monkeypatch, tmp_path):
    """bench/plain_flax.py is loaded from the source checkout; without one (a wheel) there is no module."""
    from vitctl.bench import models

    assert models.plain_flax() is not None and models.PLAIN_FLAX_PATH.parent.name == "bench"
    monkeypatch.setattr(models, "PLAIN_FLAX_PATH", tmp_path / "bench" / "plain_flax.py")
    models.plain_flax.cache_clear()
    try:
        assert models.plain_flax() is None
    finally:
        models.plain_flax.cache_clear()


# ----------------------------------------------------------------------------- CLI and no timm
def test_cli_json_and_table(cli):  # noqa: F811  (the imported fixture)
    r = cli("bench", "--tiny", "--only", "gemm", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole stdout is one JSON object
    rows = _check_rows(out["rows"])
    assert "GEMM XLA fp32" in rows and out["mode"] == "tiny"
    assert "GEMM" in r.stderr  # progress on stderr
    r = cli("bench", "--tiny", "--only", "gemm")
    assert r.returncode == 0 and "GEMM torch fp32 (MKL)" in r.stdout and "load:" in r.stdout


def test_cli_unknown_part(cli):  # noqa: F811
    r = cli("bench", "--only", "gemm,nope")
    assert r.returncode == 2 and "nope" in r.stderr and "Hint:" in r.stderr


def test_without_timm_the_timm_rows_say_so(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError, as if not installed
    out = bench.run("tiny", ("torch-forward", "torch-train")).as_dict()
    rows = _check_rows(out["rows"])
    timm_rows = [r for r in rows.values() if r["name"].endswith(("timm", "timm+AdamW"))]
    assert len(timm_rows) == 2 * (2 + 2) + 1  # per config fp32 and bf16 at b1 and b2 (no GEMM probe: every batch); train
    assert all(r["value"] is None and r["note"] == "timm not installed" for r in timm_rows)
    ours = [r for r in rows.values() if "vitctl-torch" in r["name"]]
    assert ours and all(r["value"] > 0 and r["ratio"] is None for r in ours)
    assert any("timm is not installed" in n for n in out["notes"])


def test_gpu_check_script_runs(tmp_path):
    """bench/gpu.py (the GPU check) runs end to end on a tiny config on this machine's device."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    p = subprocess.run([sys.executable, str(script), "--smoke", "--json"], capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert not r["skipped"], r["skipped"]
    got = {(row["what"], row["impl"]) for row in r["rows"]}
    assert {("forward", "vitctl-torch"), ("train", "vitctl-torch"), ("forward", "vitctl-jax"), ("train", "vitctl-jax")} <= got
    assert all(row["images_per_s"] > 0 and row["tflops"] > 0 for row in r["rows"])
    no_gpu = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=False)
    assert no_gpu.returncode == 2 and "no GPU found" in no_gpu.stderr or no_gpu.returncode == 0


def test_convert_benchmark_script_runs(tmp_path):
    """bench/convert.py (the conversion benchmark) end to end on tiny sources: every case converts, and the
    JSON has a throughput row against cp and a peak-RSS row per case."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "convert.py"
    cases = "jax-torch,jaxf-torch,jaxz-torch,torch-jax,npz16-torch,scan-torch"
    p = subprocess.run(
        [sys.executable, str(script), "--size-gib", "0.01", "--repeat", "2", "--cases", cases, "--workdir", str(tmp_path), "--max-wait", "0", "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert not report["failures"], report["failures"]
    assert [c["case"] for c in report["cases"]] == cases.split(",")
    for c in report["cases"]:
        assert len(c["convert_seconds"]) == 2 and len(c["cp_seconds"]) == 3 and c["best_convert_seconds"] == min(c["convert_seconds"])
    rows = {r["name"]: r for r in report["rows"]}
    speed = [r for n, r in rows.items() if n.endswith(" GB/s") and not n.startswith("cp ")]
    assert len(speed) == 6 and all(r["baseline"].startswith("cp ") and r["ratio"] > 0 for r in speed)
    assert sum(n.endswith(" peak RSS") for n in rows) == 6
    assert not list(tmp_path.glob("*/out-*")) and not list(tmp_path.glob("*/src-*"))  # outputs and sources removed


# ----------------------------------------------------------------------------- width and interruption
FULL_NAMES = [  # the longest row names of a full run (README's table)
    ("train parallel B/16 fp32 b8 vitctl-jax GFLOP/s", "GFLOP/s", "GEMM torch fp32 (oneDNN)"),
    ("forward classic B/16 fp32 b32 vitctl-torch", "images/s", "forward classic B/16 fp32 b32 timm"),
    ("forward parallel B/16 fp32 b8 plain-flax", "images/s", "forward parallel B/16 fp32 b8 timm"),
    ("convert jax-to-torch parallel S/16", "GB/s", "cp -r (same bytes)"),
    ("vitctl info vit-22b peak RSS", "MiB", "vitctl --help peak RSS"),
]


def test_table_fits_80_columns_and_keeps_every_figure():
    """The CLI's table (no notes) fits 80 columns with the full mode's longest names: lines at most 80
    wide, every value, unit and ratio whole, every word of every name shown."""
    from rich.console import Console

    rows = bench.link([bench.Row(n, 123.456, u, b, note="best of 4 shapes: 768x3072x768, compile 12.3 s") for n, u, b in FULL_NAMES])
    for r in rows:
        r.ratio = 0.987
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(bench.rows_table("vitctl bench (full): AMD EPYC, 2 cores", rows, notes=False))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    words = text.split()
    assert words.count("123") == len(rows) and words.count("0.99") == len(rows)
    for n, u, _ in FULL_NAMES:
        assert all(w in words for w in n.split()) and u in words
    assert "compile" not in text  # notes: --json only


def _bench_until_rows(args: list[str], last_row: str, sig: int):
    """Starts `vitctl bench --tiny ARGS`, waits until its stderr reports `last_row` measured, sends
    `sig`, and returns (exit code, stdout, stderr, the rows reported before the signal)."""
    import os
    import subprocess

    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "vitctl", "bench", "--tiny", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)  # fmt: skip
    seen, before = [], []
    try:
        for line in p.stderr:  # waits on the rows themselves, not on a clock
            seen.append(line)
            if m := re.search(r"row: (.+?) = ", line):
                before.append(m.group(1))
            if last_row in before:
                p.send_signal(sig)
                break
        out, rest = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert last_row in before, "".join(seen)[-3000:]
    return p.returncode, out, "".join(seen) + rest, before


@pytest.mark.parametrize("sig, fmt", [("SIGTERM", "--json"), ("SIGINT", "table")])
def test_interrupt_prints_the_rows_so_far_and_exits_130(sig, fmt):
    """SIGTERM or Ctrl-C during `vitctl bench` (here: after the GEMM rows, while the CLI rows run their
    child processes): the rows measured so far are printed, as --json or as the table at the
    terminal's width (80 columns in a pipe), and it exits 130."""
    import signal

    pytest.importorskip("torch")
    pytest.importorskip("jax")
    args = ["--only", "gemm,cli"] + (["--json"] if fmt == "--json" else [])
    code, out, err, before = _bench_until_rows(args, "GEMM XLA bf16", getattr(signal, sig))
    assert code == 130, err[-3000:]
    assert "Interrupted: stopped during" in err
    if fmt == "--json":
        report = json.loads(out)  # stdout is still one JSON object
        assert [r["name"] for r in report["rows"]][: len(before)] == before and report["interrupted"] in ("gemm", "cli")
        assert any("interrupted during" in n for n in report["notes"])
    else:
        assert max(map(len, out.splitlines())) <= 80 and "interrupted during" in out
        assert all(name in out for name in before)


def test_transfer_benchmark_script_runs(tmp_path):
    """bench/transfer.py (fine-tuning step and checkpoint load) end to end at its tiny size: a row per
    step variant against the scratch step and the GEMM peak, and per format a load onto the 8-device
    mesh against cp of the same bytes; the checkpoints are removed."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "transfer.py"
    p = subprocess.run([sys.executable, str(script), "--tiny", "--json", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = _check_rows(json.loads(p.stdout)["rows"])
    peak = max((r for r in rows.values() if r["name"].startswith("GEMM")), key=lambda r: r["value"])
    steps = [n for n in rows if n.startswith("train tiny fp32 b2 ") and not n.endswith("GFLOP/s")]
    assert steps == ["train tiny fp32 b2 scratch", "train tiny fp32 b2 fine-tune"]
    for name in steps:
        assert rows[name]["value"] > 0 and rows[f"{name} GFLOP/s"]["baseline"] == peak["name"]
        assert rows[name]["baseline"] == (None if name.endswith("scratch") else "train tiny fp32 b2 scratch")
    for fmt in ("vitctl-jax", "vitctl-torch", "timm"):
        load = rows[f"load {fmt} tiny -> data=2,fsdp=2,tensor=2"]
        assert load["baseline"] == f"cp -r {fmt} tiny" and load["ratio"] > 0 and "on 8 devices" in load["note"]
    assert not any(tmp_path.iterdir())  # checkpoints and copies removed


def test_data_benchmark_script_runs(tmp_path):
    """bench/data.py (the input pipeline against timm's, and the train step it feeds) end to end at its
    tiny size: per worker count, vitctl's pipeline over the ImageFolder and over its packed form against
    timm's loader on the same files, and the step fed by it against the step on a synthetic batch; the
    generated images and the packed set are removed."""
    import subprocess

    pytest.importorskip("timm")
    pytest.importorskip("grain")
    script = Path(__file__).resolve().parents[1] / "bench" / "data.py"
    p = subprocess.run([sys.executable, str(script), "--tiny", "--json", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = _check_rows(json.loads(p.stdout)["rows"])
    for w in (0, 1):
        timm = rows[f"input imagefolder b8 w{w} timm"]
        assert timm["value"] > 0 and timm["unit"] == "images/s"
        for src in ("imagefolder", "packed"):
            ours = rows[f"input {src} b8 w{w} vitctl"]
            assert ours["baseline"] == timm["name"] and ours["value"] > 0 and ours["ratio"] > 0, ours
        fed = rows[f"train tiny b8 w{w} packed"]
        assert fed["baseline"] == "train tiny b8 synthetic" and fed["value"] > 0 and fed["ratio"] > 0, fed
    assert rows["train tiny b8 synthetic"]["value"] > 0
    assert rows["train tiny b8 workers for input >= 0.95 of synthetic"]["unit"] == "workers"
    assert not any(tmp_path.iterdir())


def test_infer_benchmark_script_runs(tmp_path):
    """bench/infer.py at its tiny size: predict and eval rows against timm's loops, the forwards alone; nothing left behind."""
    import subprocess

    pytest.importorskip("timm")
    script = Path(__file__).resolve().parents[1] / "bench" / "infer.py"
    p = subprocess.run([sys.executable, str(script), "--tiny", "--json", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = _check_rows(json.loads(p.stdout)["rows"])
    for part in ("predict", "eval"):
        ours = rows[f"{part} b8 vitctl"]
        assert ours["baseline"] == f"{part} b8 timm w2" and ours["value"] > 0 and ours["ratio"] > 0, ours
    assert rows["forward b8 vitctl-torch"]["baseline"] == "forward b8 timm" and rows["forward b8 timm"]["value"] > 0
    assert not any(tmp_path.iterdir())
