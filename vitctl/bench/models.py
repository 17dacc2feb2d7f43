"""The models the benchmark times, each as a synchronised call: vitctl-torch and timm (forward,
AdamW train step), the train step of `vitctl train --backend torch`, vitctl-jax (jitted forward, `vitctl train`'s step), and the plain Flax
baseline, which lives beside the benchmark scripts in the source checkout (bench/plain_flax.py).

torch, jax, flax and timm are imported by the functions that need them. timm is optional.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vitctl.params import random_weights

# The plain Flax baseline is a benchmark script, not part of the library: it is found in the
# source checkout that this vitctl package belongs to (an editable install or `python -m vitctl`
# from the repository); an installed wheel has no bench/ folder, and its plain-flax rows say so.
PLAIN_FLAX_PATH = Path(__file__).resolve().parents[2] / "bench" / "plain_flax.py"
PLAIN_FLAX_MISSING = "plain-flax baseline not found: bench/plain_flax.py comes with the source checkout"


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_model(cfg, dtype: str = "float32"):
    """timm's model computing the same function as vitctl's `cfg` (vitctl.convert.timm.timm_spec), random init, in `dtype`."""
    import timm
    import torch

    from vitctl.convert.timm import timm_spec

    spec = timm_spec(cfg)
    torch.manual_seed(0)
    return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).to(
        {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    )


def vitctl_torch_model(cfg):
    """vitctl's torch ViT for `cfg`, returning logits only (as timm's)."""
    from torch import nn

    from vitctl.model_torch.model import init_model

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = init_model(cfg, seed=0)

        def forward(self, x):
            return self.vit(x)[0]

    return Logits()


def torch_forward(model, cfg, batch: int, dtype: str) -> Callable[[], None]:
    """One synchronised inference call on a fixed random batch [B, C, H, W]."""
    import torch

    model.eval()
    x = torch.randn(
        batch, cfg.channels, cfg.image_size, cfg.image_size, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    )

    def call():
        with torch.inference_mode():
            model(x)

    return call


def torch_train_step(model, cfg, batch: int) -> Callable[[], None]:
    """One plain fp32 train step: cross-entropy, backward, torch.optim.AdamW (lr 1e-3, wd 1e-4)."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)

    def call():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return call


def vitctl_train_step(cfg, batch: int, device: str = "cpu") -> Callable[[], None]:
    """The train step of `vitctl train --backend torch` (vitctl.train.torch_step.train_step: the model's
    own compute dtype over float32 parameters, softmax cross-entropy, global-norm clipping, torch_optim's
    AdamW with its weight-decay mask) on one process, on a fixed random batch; a synchronised call."""
    import torch

    from vitctl.train.settings import TrainConfig
    from vitctl.train.torch_optim import make_optimizer, schedule
    from vitctl.train.torch_step import build_model, train_step

    tcfg = TrainConfig(batch_size=batch, steps=1000, warmup=10, backend="torch")
    model = build_model(cfg, 0)[0].to(device)
    lr_fn = schedule(tcfg.lr, tcfg.steps, tcfg.warmup)
    opt = make_optimizer(model, cfg, tcfg, lr_fn)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    return lambda: train_step(model, opt, x, y, cfg, tcfg, lr_fn)  # returns floats: synchronised


def jax_forward(cfg, batch: int) -> tuple[Callable[[], None], float]:
    """vitctl-jax jit(forward) compiled ahead of time, logits only (XLA drops the unused
    intermediates), on random_weights (numpy: no eager init, whose many small XLA programs
    take longer to compile than the forward); returns (synchronised call, compile seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from vitctl.model_jax.model import DTYPES, abstract_model
    from vitctl.model_jax.state import load_flat_params

    model = abstract_model(cfg)
    load_flat_params(model, {n: w.astype(DTYPES[cfg.param_dtype]) for n, w in random_weights(cfg).items()})
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)[0]

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels)), DTYPES[cfg.dtype])
    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    return (lambda: jax.block_until_ready(compiled(state, x))), compile_s


def jax_train_step(cfg, batch: int) -> tuple[Callable[[], None], float]:
    """The train step of `vitctl train` (vitctl.train.step.Setup: AdamW, global-norm clipping,
    softmax cross-entropy, donated state) on one device; returns (synchronised call,
    seconds to compile and run the first step)."""
    import jax
    import numpy as np

    from vitctl.train.distributed import mesh_for
    from vitctl.train.settings import TrainConfig
    from vitctl.train.step import Setup

    setup = Setup(cfg, TrainConfig(batch_size=batch, steps=1000, warmup=10), mesh_for(""))
    rng = np.random.default_rng(0)
    images, labels = setup.put_batch(
        rng.standard_normal((batch, cfg.image_size, cfg.image_size, cfg.channels), np.float32),
        rng.integers(0, cfg.num_classes, batch),
    )
    box = {"state": setup.init_state(0)}

    def call():  # the state is donated: keep the new one
        box["state"], metrics = setup.train_step(box["state"], images, labels)
        jax.block_until_ready(metrics)

    t0 = time.perf_counter()
    call()
    return call, time.perf_counter() - t0


def timm_spec_name(cfg) -> str:
    from vitctl.convert.timm import timm_spec

    return f"timm {timm_spec(cfg)['model_name']}-like (timm_spec)"


@functools.cache
def plain_flax():
    """bench/plain_flax.py of this package's source checkout, imported as a module (its
    `plain_flax_model` and `plain_flax_forward`); None where there is no such file."""
    if not PLAIN_FLAX_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location("vitctl_bench_plain_flax", PLAIN_FLAX_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # classes defined in it look their module up by name (dataclasses, pickle)
    spec.loader.exec_module(module)
    return module
