"""Test-only Orbax helpers: restoring params/ with Orbax itself (the proof that what vitctl writes is
a real Orbax checkpoint), and writing one with vitctl's OrbaxWriter from stacked arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vitctl.formats import layout
from vitctl.formats.base import CHUNK_BYTES
from vitctl.formats.orbax import OrbaxWriter
from vitctl.params import jax_param_shapes, unstack


def orbax_restore(ckpt, cfg) -> dict[str, np.ndarray]:
    """ckpt/params/ restored by Orbax's StandardCheckpointer into an abstract target built from `cfg`
    (shapes and param_dtype, one local device whatever the writer's topology), as numpy arrays."""
    jax = pytest.importorskip("jax")
    ocp = pytest.importorskip("orbax.checkpoint")
    path = (Path(ckpt) / layout.PARAMS).absolute()
    dtype = jax.numpy.dtype(cfg.param_dtype)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = layout.nest({n: jax.ShapeDtypeStruct(s, dtype, sharding=one) for n, s in jax_param_shapes(cfg).items()})
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, target)
    return {n: np.asarray(a) for n, a in layout.flatten(restored).items()}


def specs(state):
    return [(n, a.shape, a.dtype) for n, a in state.items()]


def write_orbax(params_dir, flat, depth, chunk_bytes=CHUNK_BYTES, order=None, **options):
    """Writes stacked `flat` layer by layer (in `order` of per-layer names, if given) with OrbaxWriter(**options)."""
    per_layer = dict(unstack(flat, depth))
    w = OrbaxWriter(params_dir, specs(per_layer), chunk_bytes, **options)
    for n in order or per_layer:
        w.write(n, per_layer[n])
    w.close()
    return per_layer


def zarr_metadata(params_dir):
    """{stored array name: its .zarray}, from an OCDBT database or from one directory per array."""
    if not (params_dir / "manifest.ocdbt").exists():
        return {z.parent.name: json.loads(z.read_text()) for z in params_dir.glob("*/.zarray")}
    ts = pytest.importorskip("tensorstore")
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params_dir.absolute()}/"}).result()
    return {k.decode()[: -len("/.zarray")]: json.loads(kv.read(k).result().value) for k in kv.list().result() if k.endswith(b"/.zarray")}


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        assert got[n].tobytes() == np.ascontiguousarray(want[n]).tobytes(), n
