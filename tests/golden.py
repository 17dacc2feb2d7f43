"""Pinned logits for fixed parameters and inputs, so a refactor cannot silently change
the numbers (HF's EXPECTED_OUTPUTS idea). Parameters come from numpy's seeded
generator (tests/conftest.random_params), which is stable across platforms."""

import numpy as np

from tests.conftest import random_params, tiny

CLASSIC = {  # big_vision's ViT: sequential block, LayerNorm with biases, QKV bias, tanh GELU, class token
    "block": "sequential",
    "qk_norm": False,
    "qkv_bias": True,
    "norm": "layernorm",
    "norm_bias": True,
    "gelu_approximate": True,
    "pool": "tok",
}
CASES = {
    "vit22b": ({}, [[0.5401565, 0.9623145, 0.1683118, 0.6753455, -1.7163192], [-0.2045804, 0.7626147, 1.0175205, 0.8438278, -0.6329299]]),
    "classic": (
        CLASSIC,
        [[0.6205087, 1.4984772, -1.030425, 0.0911191, -0.6515993], [0.1264127, 1.6662306, -1.4554541, -0.3600604, -1.2703732]],
    ),
}


def golden_case(name):
    """(cfg, params, images NHWC, expected logits[:, :5])."""
    kw, expected = CASES[name]
    cfg = tiny(**kw)
    x = np.random.default_rng(7).uniform(-1, 1, (2, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
    return cfg, random_params(cfg, seed=7), x, np.array(expected, np.float32)
