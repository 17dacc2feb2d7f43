"""Shared fixtures. Sets up 8 simulated CPU devices before anything imports jax."""

import os

# Must precede the first `import jax` anywhere in the test session (Flax GSPMD guide).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("VITCTL_TEST", "1")

import dataclasses
import signal

# A shell starts background jobs with SIGINT ignored, and children inherit that: Ctrl-C tests
# (in-process and in vitctl subprocesses) need Python's own handler, however pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest

from vitctl.config import ViTConfig

# Every dimension differs (D=48, N=3, K=16, F=80, L=2, P=4, T=16, classes=10), so a
# wrong transpose or reshape fails loudly instead of passing by accident.
TINY = ViTConfig(width=48, depth=2, mlp_dim=80, num_heads=3, patch_size=4, image_size=16, num_classes=10, head_zero_init=False)


@pytest.fixture
def tiny_cfg() -> ViTConfig:
    return TINY


def tiny(**overrides) -> ViTConfig:
    return dataclasses.replace(TINY, **overrides)


@pytest.fixture(autouse=True)
def _fp32_exact():
    """Parity runs in true fp32: highest matmul precision in JAX, no TF32 in torch."""
    try:
        import jax
    except ImportError:
        jax = None
    if jax is not None:
        jax.config.update("jax_default_matmul_precision", "highest")
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        pass
    yield


def random_params(cfg: ViTConfig, seed: int = 0):
    """JAX-named (stacked) float32 numpy parameters with distinct, non-trivial values
    (vitctl.params.random_weights: no XLA compile, the same on every backend)."""
    from vitctl.params import random_weights

    return random_weights(cfg, seed)


def jax_model(cfg: ViTConfig, params):
    from vitctl.model_jax.model import abstract_model
    from vitctl.model_jax.state import load_flat_params

    model = abstract_model(cfg)
    load_flat_params(model, params)
    return model


def torch_model(cfg: ViTConfig, params):
    """The PyTorch model holding `params` (JAX-named), converted by the mapping table and
    loaded strictly."""
    import numpy as np
    import torch

    from vitctl.convert.mapping import jax_to_torch
    from vitctl.model_torch.model import ViT

    model = ViT(cfg).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in jax_to_torch(params, cfg).items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model
