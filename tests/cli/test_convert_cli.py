"""`vitctl convert`: output streams, exit codes, and the failures only a real process shows.

In-process runs go through `main()` (same error mapping as the console script). Signals
(SIGINT, SIGTERM), a full disk (RLIMIT_FSIZE with SIGXFSZ ignored: writes fail with
EFBIG) and memory use are tested on a real subprocess.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import tiny
from tests.convert.test_convert import BV_CFG, assert_nothing_written, make_jax, make_torch, params, tree_hash, write_npz
from vitctl import checkpoint as ckpt
from vitctl.convert import convert as cv
from vitctl.formats import layout
from vitctl.formats.orbax import OrbaxWriter
from vitctl.params import jax_param_shapes

CFG = tiny(depth=3)
# Runs the CLI in a fresh interpreter; at exit reports the frameworks it imported and its peak RSS
# (VmHWM: ru_maxrss would include the pytest process the child was forked from).
WRAPPER = """
import atexit, json, sys
from vitctl.convert.convert import peak_rss_bytes
def report():
    heavy = sorted(m for m in ("jax", "torch", "flax", "orbax") if m in sys.modules)
    sys.stderr.write("\\nREPORT " + json.dumps({"heavy": heavy, "peak_rss_bytes": peak_rss_bytes()}) + "\\n")
atexit.register(report)
from vitctl.cli import main
main(sys.argv[1:])
"""


def run_reported(*args, **kwargs):
    p = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True, check=False, **kwargs)
    stderr, _, report = p.stderr.rpartition("REPORT ")
    return p, stderr, json.loads(report)


@pytest.fixture(scope="module")
def jax_src(tmp_path_factory):
    pytest.importorskip("orbax.checkpoint")
    return make_jax(tmp_path_factory.mktemp("src") / "jax")


def test_convert_prints_dst_on_stdout(cli, jax_src, tmp_path):
    code, out, err = cli("convert", "jax-to-torch", jax_src, tmp_path / "pt")
    assert (code, out) == (0, f"{tmp_path / 'pt'}\n")
    assert "tensors" in err and "peak memory" in err and "Error" not in err  # no progress bar when stderr is not a terminal
    code, out, err = cli("convert", "torch-to-jax", tmp_path / "pt", tmp_path / "jax")
    assert (code, out) == (0, f"{tmp_path / 'jax'}\n")


def test_json_is_one_object(cli, jax_src, tmp_path):
    code, out, _ = cli("convert", "jax-to-torch", jax_src, tmp_path / "pt", "--json", "--dtype", "bfloat16", "--max-shard-size", "40KB")
    assert code == 0
    d = json.loads(out)
    keys = {
        "src",
        "dst",
        "format",
        "source_format",
        "tensors",
        "bytes",
        "shards",
        "seconds",
        "peak_rss_bytes",
        "estimated_peak_bytes",
        "dry_run",
    }
    assert keys <= set(d) and d["dry_run"] is False
    assert (d["format"], d["source_format"], d["dtype"], d["tensors"]) == (
        "vitctl-torch",
        "vitctl-jax",
        "bfloat16",
        len(jax_param_shapes(CFG, stacked=False)),
    )
    assert d["shards"] > 1 and len([f for f in d["files"] if f.endswith(".safetensors")]) == d["shards"]
    assert d["bytes"] == sum(a.nbytes for a in params().values()) // 2 and d["seconds"] >= 0 and d["peak_rss_bytes"] > 2**20


def test_dry_run_prints_the_plan_and_writes_nothing(cli, jax_src, tmp_path):
    code, out, _ = cli("convert", "jax-to-torch", jax_src, tmp_path / "pt", "--dry-run", "--max-shard-size", "40KB")
    assert code == 0 and "tensors" in out and "estimated peak memory" in out and "model-00001-of-" in out
    code, out, _ = cli("convert", "torch-to-jax", jax_src, tmp_path / "jax", "--dry-run", "--json", "--from", "vitctl-torch")
    assert code == 1  # the directory holds no torch weights: an error even in a dry run
    code, out, _ = cli("convert", "jax-to-torch", jax_src, tmp_path / "pt", "--dry-run", "--json")
    d = json.loads(out)
    assert code == 0 and d["dry_run"] is True and d["files"] == ["config.json", "model.safetensors"] and "seconds" not in d
    assert_nothing_written(tmp_path / "pt")


def test_exit_codes(cli, jax_src, tmp_path):
    cli("convert", "jax-to-torch", jax_src, tmp_path / "pt")
    code, out, err = cli("convert", "jax-to-torch", jax_src, tmp_path / "pt")
    assert (code, out) == (2, "") and "Error: " in err and "already exists" in err and "--force" in err
    assert cli("convert", "jax-to-torch", jax_src, tmp_path / "pt", "--force")[0] == 0
    code, _, err = cli("convert", "jax-to-torch", jax_src, tmp_path / "x", "--max-shard-size", "lots")
    assert code == 2 and "invalid size 'lots'" in err
    code, _, err = cli("convert", "torch-to-jax", tmp_path / "pt", tmp_path / "x", "--format", "timm")
    assert code == 2 and "--format timm is not available" in err
    code, _, err = cli("convert", "jax-to-torch", tmp_path / "absent", tmp_path / "x")
    assert code == 2  # Typer: SRC must exist
    code, _, err = cli("convert", "jax-to-torch", jax_src, tmp_path / "x", "--model", "vit22b-mu/16")
    assert code == 1 and "does not match the model config" in err and "Hint:" in err
    assert_nothing_written(tmp_path / "x")


def test_big_vision_npz_source(cli, jax_src, tmp_path):
    src = write_npz(tmp_path / "vit.npz", params(BV_CFG), BV_CFG)
    code, out, err = cli("convert", "jax-to-torch", src, tmp_path / "pt", "--format", "timm")
    assert (code, out) == (0, f"{tmp_path / 'pt'}\n") and "note: " in err  # what the weights cannot show (preprocessing)
    code, _, err = cli("convert", "jax-to-torch", jax_src, tmp_path / "x", "--prefix", "params/img")
    assert code == 2 and "--prefix applies to big_vision .npz sources only" in err


def test_corrupt_input_names_the_file_and_tensor(cli, tmp_path):
    src = make_torch(tmp_path / "pt")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    code, out, err = cli("convert", "torch-to-jax", src, tmp_path / "jax")
    assert (code, out) == (1, "")
    assert f"Error: cannot read {f}: tensor '" in err and "truncated" in err
    assert_nothing_written(tmp_path / "jax")


def test_convert_imports_neither_jax_nor_torch(jax_src, tmp_path):
    """Streaming needs numpy, safetensors' format and tensorstore only: a torch-only or jax-only install converts."""
    p, stderr, report = run_reported("convert", "jax-to-torch", jax_src, tmp_path / "pt")
    assert p.returncode == 0, stderr
    p, stderr, report2 = run_reported("convert", "torch-to-jax", tmp_path / "pt", tmp_path / "jax")
    assert p.returncode == 0, stderr
    assert report["heavy"] == report2["heavy"] == []


# Real processes: signals, a full disk, memory.
def slow_env(seconds_per_tensor):
    return {**os.environ, cv.SLEEP_ENV: str(seconds_per_tensor), "PYTHONDONTWRITEBYTECODE": "1"}


def wait_for_temporary(dst, proc, timeout=60):
    """Waits until the conversion has started writing (its temporary sibling exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp-")]:
            return
        time.sleep(0.02)
    pytest.fail(f"the conversion never started writing: {proc.communicate()}")


@pytest.mark.parametrize(
    "direction,sig", [("jax-to-torch", signal.SIGTERM), ("torch-to-jax", signal.SIGINT), ("torch-to-jax", signal.SIGTERM)]
)
def test_interrupted_conversion_leaves_nothing(jax_src, tmp_path, direction, sig):
    src = jax_src
    if direction == "torch-to-jax":
        src = make_torch(tmp_path / "pt")
    before, dst = tree_hash(src), tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitctl", "convert", direction, str(src), str(dst)],
        env=slow_env(0.05),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_temporary(dst, proc)
    time.sleep(0.3)  # a few tensors written (and, for Orbax, some still being written in the background)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out == "" and "Interrupted: nothing was written." in err
    assert_nothing_written(dst)
    assert tree_hash(src) == before


# Sets the file size limit, ignores SIGXFSZ (so a write past the limit fails with EFBIG instead of
# killing the process; the disposition survives exec), then execs the CLI. A wrapper process rather
# than preexec_fn: forking the multi-threaded pytest process and running Python before exec can deadlock.
LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable, "-m", "vitctl", *sys.argv[2:]])
"""


@pytest.mark.parametrize("direction", ["jax-to-torch", "torch-to-jax"])
def test_full_disk_fails_cleanly(jax_src, tmp_path, direction):
    src = jax_src if direction == "jax-to-torch" else make_torch(tmp_path / "pt")
    before, dst = tree_hash(src), tmp_path / "out"
    largest = max(np.prod(s) * 4 for s in jax_param_shapes(CFG, stacked=False).values())
    args = ["convert", direction, str(src), str(dst)]
    p = subprocess.run(
        [sys.executable, "-c", LIMITED, str(int(largest) // 2), *args],
        env=slow_env(0),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 1, p.stderr
    assert p.stdout == "" and "Error: cannot write tensor '" in p.stderr and "File too large" in p.stderr
    assert "free disk space" in p.stderr  # the hint
    assert_nothing_written(dst)
    assert tree_hash(src) == before


def test_memory_is_bounded_by_a_tensor_not_the_checkpoint(tmp_path):
    """A 129 MB checkpoint whose largest tensor is 1 MiB: converting adds a few tensors' worth of RSS (measured: 6 and 15 MiB)."""
    cfg = tiny(width=256, num_heads=4, mlp_dim=1024, depth=40, image_size=32, patch_size=4)
    src = tmp_path / "jax"
    src.mkdir()
    ckpt.write_config(src, cfg, {})
    rng = np.random.default_rng(0)
    specs = [(n, s, np.dtype(np.float32)) for n, s in jax_param_shapes(cfg, stacked=False).items()]
    w = OrbaxWriter(src / "params", specs, layout.CHUNK_BYTES, compress=False)
    for n, s, _ in specs:
        w.write(n, rng.standard_normal(s, dtype=np.float32))
    w.close()
    size = sum(np.prod(s) * 4 for _, s, _ in specs)
    assert size > 120e6
    _, _, idle = run_reported("convert", "jax-to-torch", src, tmp_path / "pt", "--dry-run")  # imports + plan, no data
    for args in (("jax-to-torch", src, tmp_path / "pt"), ("torch-to-jax", tmp_path / "pt", tmp_path / "jax2")):
        p, stderr, report = run_reported("convert", *args, "--json")
        assert p.returncode == 0, stderr
        added = report["peak_rss_bytes"] - idle["peak_rss_bytes"]
        assert added < 0.25 * size, f"{args[0]}: converting added {added / 2**20:.0f} MiB of RSS for a {size / 2**20:.0f} MiB checkpoint"
        result = json.loads(p.stdout)
        assert result["estimated_peak_bytes"] >= report["peak_rss_bytes"] >= result["peak_rss_bytes"]
