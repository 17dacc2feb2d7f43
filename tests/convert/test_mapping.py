"""jax_to_torch / torch_to_jax: bit-identical round trips, dtypes kept, coverage errors named."""

import numpy as np
import pytest

from tests.conftest import random_params, tiny
from vitctl.convert import mapping
from vitctl.errors import UnmappedParamError


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"block": "sequential", "pool": "tok", "qkv_bias": True, "norm_bias": True},
        {"pool": "gap", "posemb": "sincos2d", "num_classes": 0},
    ],
)
def test_round_trip_is_bit_identical(kw):
    cfg = tiny(**kw)
    params = random_params(cfg)
    back = mapping.torch_to_jax(mapping.jax_to_torch(params, cfg), cfg)
    assert back.keys() == params.keys()
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_bf16_round_trip_keeps_dtype():
    import ml_dtypes

    cfg = tiny()
    params = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_params(cfg).items()}
    state = mapping.jax_to_torch(params, cfg)
    assert {v.dtype for v in state.values()} == {np.dtype(ml_dtypes.bfloat16)}
    back = mapping.torch_to_jax(state, cfg)
    assert all(np.array_equal(back[k].view(np.uint16), params[k].view(np.uint16)) for k in params)


def test_missing_unexpected_and_misshaped_tensors_are_named():
    cfg = tiny()
    params = random_params(cfg)
    state = mapping.jax_to_torch(params, cfg)

    missing = {k: v for k, v in state.items() if k != "blocks.1.k.weight"}
    with pytest.raises(UnmappedParamError, match=r"missing 1: blocks\.1\.k\.weight"):
        mapping.torch_to_jax(missing, cfg)

    extra = {**state, "blocks.0.q.bias": np.zeros(48, np.float32)}
    with pytest.raises(UnmappedParamError, match=r"unexpected 1: blocks\.0\.q\.bias"):
        mapping.torch_to_jax(extra, cfg)

    wrong = {**state, "head.weight": state["head.weight"].T}
    with pytest.raises(UnmappedParamError, match=r"'head\.weight' has shape \(48, 10\), expected \(10, 48\)"):
        mapping.torch_to_jax(wrong, cfg)

    with pytest.raises(UnmappedParamError, match="missing 1: blocks/mlp_in/bias"):
        mapping.jax_to_torch({k: v for k, v in params.items() if k != "blocks/mlp_in/bias"}, cfg)
