"""The same training run in JAX and in PyTorch (bench/drift.py's two loops): the same initial
weights, the same batches in the same order, the same hyper-parameters; the loss at every step
and the final weights agree to float32 round-off, amplified a little by training.

Measured on this file's run (TINY, 24 steps of batch 4 cycling 4 random batches, lr 1e-3,
cosine with 2 warmup steps; the loss falls from 2.50 to 0.46 with AdamW, to 0.002 with
Adafactor): the per-step loss relative difference reaches 5.8e-7 (AdamW) and 1.4e-5 (Adafactor,
whose loss ends near 0, where a relative difference grows), the final weights' max-abs
difference 1.2e-7 (AdamW) and 6.3e-7 (Adafactor). The bars are those figures times ~10. A real
difference (another optimizer constant, another GELU form) moves the loss by 1e-3 or more
within a few steps.
"""

import dataclasses

import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

from bench.drift import drift, random_batches, settings
from tests.conftest import tiny

CFG = tiny()
STEPS = 24
# optimizer -> (bar on the per-step loss relative difference, bar on the final weights' max-abs difference)
BARS = {"adamw": (6e-6, 1.2e-6), "adafactor": (1.5e-4, 6e-6)}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_jax_and_torch_training_stay_together(optimizer):
    tcfg = dataclasses.replace(settings(optimizer, STEPS, 4), warmup=2)
    r = drift(CFG, tcfg, random_batches(CFG, STEPS, 4))
    assert r["loss_last"] < r["loss_first"] - 1.0, "the run must learn for the comparison to mean anything"
    loss_bar, weights_bar = BARS[optimizer]
    assert r["loss_rel_max"] < loss_bar, r
    assert r["weights_max_abs"] < weights_bar, r
