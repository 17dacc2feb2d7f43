"""Flat memory: `vitctl train` streams its data, so a packed data set ten times larger (~20 MB and
~200 MB of JPEG here) leaves every process's peak memory where it was.

Both sets are written by bench/data.py's generator (a process pool; the smaller set is a hard-linked
subset of the larger) and packed by `vitctl data pack` into 16 MB shards (2 and 13 of them). Each
`vitctl train` (tiny model at 32 px, --workers 1, batch 32, 120 steps: the larger run reads ~3,800
images, ~120 MB, more than the whole smaller set) runs as a child of a small watcher process
(bench/data.py's), which reads from /proc every 0.25 s the VmHWM (kernel-kept peak RSS) of the
trainer and of each of its worker processes, and the PSS summed over all of them. Asserted: each of
these peaks grew by less than 100 MiB from the smaller set to the larger, and by less than half of
what the data set grew (~170 MiB): nothing holds the data set, or what it has read of it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # ~2 minutes on 2 cores: two data sets, two training runs

SIZES_GB = (0.02, 0.2)
STEPS = 120
PEAKS = {"trainer_hwm_kib": "the trainer's peak RSS", "worker_hwm_kib": "a worker's peak RSS", "pss_peak_kib": "the PSS of all"}


def bench_data():
    """bench/data.py of this checkout, as a module (its generator, pack and watcher)."""
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its pool workers (forked) find their function by this name
    spec.loader.exec_module(module)
    return module


def _env() -> dict:
    import os

    return {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}


def test_train_peak_memory_does_not_grow_with_the_data_set(tmp_path):
    pytest.importorskip("grain")
    pytest.importorskip("jax")
    data = bench_data()
    sets = data.make_sets(tmp_path, list(SIZES_GB), shard_size="16MB")
    (small, n_small, bytes_small), (large, n_large, bytes_large) = sets
    assert n_large == 10 * n_small and 8 * bytes_small < bytes_large
    assert len(list(large.glob("train-*.array_record"))) > len(list(small.glob("train-*.array_record"))) >= 2
    peaks = []
    for packed, _, _ in sets:
        r = data.watch(data.train_command(packed, tmp_path / f"run-{packed.name}", STEPS, workers=1, batch=32, size=32), timeout=900)
        assert r["exit_code"] == 0, r["stderr"][-3000:]
        assert r["polls"] > 10 and r["workers"] >= 1, r  # watched while it ran, the worker process too
        peaks.append(r)
    grew = bytes_large - bytes_small
    for key, what in PEAKS.items():
        small_mib, large_mib = peaks[0][key] / 1024, peaks[1][key] / 1024
        growth = (peaks[1][key] - peaks[0][key]) * 1024
        report = (
            f"{what}: {small_mib:.0f} MiB on {bytes_small / 2**20:.0f} MiB of data, {large_mib:.0f} MiB on {bytes_large / 2**20:.0f} MiB"
        )
        assert growth < 100 * 2**20, report
        assert growth < grew / 2, report
