"""Hostile checkpoints against `vitctl verify` and `vitctl probe`: refused from their headers, with
`Error:` and a hint, before any data is read or any model is built (same checks as convert)."""

import json
import shutil
import struct
import zipfile

import numpy as np
import pytest

from tests.adversarial.conftest import assert_refused, run_vitctl
from tests.adversarial.test_convert import npy, with_depth, write_torch
from vitctl.convert import convert as cv


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_torch(root / "torch")
    cv.convert(root / "torch", root / "jax", "torch-to-jax")
    return root


@pytest.fixture
def pair(sources, sandbox):
    """(a, b): fresh copies of a torch and a JAX checkpoint of the same model, in the sandbox."""
    a, b = sandbox.root / "a", sandbox.root / "b"
    shutil.copytree(sources / "torch", a)
    shutil.copytree(sources / "jax", b)
    return a, b


def verify(sandbox, a, b):
    sandbox.before()
    return run_vitctl("verify", a, b, cwd=sandbox.root, env={"VITCTL_CACHE": str(sandbox.root / "cache")}, timeout=240)


def probe(sandbox, ckpt):
    sandbox.before()
    return run_vitctl("probe", ckpt, "--data", "digits", "--mode", "fewshot", "--shots", "1", cwd=sandbox.root,
                      env={"VITCTL_CACHE": str(sandbox.root / "cache")}, timeout=240)  # fmt: skip


def test_verify_huge_depth_config(pair, sandbox):
    with_depth(pair[1], 4096)
    assert_refused(verify(sandbox, *pair), sandbox, 1, says="needs 49,169 tensors, the weights hold 41")


def test_probe_huge_depth_config(pair, sandbox):
    with_depth(pair[0], 4096)
    assert_refused(probe(sandbox, pair[0]), sandbox, 1, says="needs 49,169 tensors")


def test_verify_symlink_out_of_the_checkpoint(pair, sandbox):
    f = pair[0] / "model.safetensors"
    f.rename(sandbox.root / "elsewhere.safetensors")
    f.symlink_to(sandbox.root / "elsewhere.safetensors")
    assert_refused(verify(sandbox, *pair), sandbox, 1, says="leads outside the checkpoint")


def test_probe_params_file_symlinked_out(pair, sandbox):
    chunk = next(p for p in sorted((pair[1] / "params" / "head.kernel").iterdir()) if not p.name.startswith("."))
    (sandbox.root / "private").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(sandbox.root / "private")
    assert_refused(probe(sandbox, pair[1]), sandbox, 1, says="leads outside the checkpoint")


def test_verify_hostile_zarray(pair, sandbox):
    path = pair[1] / "params" / "head.bias" / ".zarray"
    z = json.loads(path.read_text())
    path.write_text(json.dumps({**z, "chunks": [2**40]}))
    assert_refused(verify(sandbox, *pair), sandbox, 1, says="larger than the array")


def test_verify_deep_json_in_the_safetensors_header(pair, sandbox):
    f = pair[0] / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].rstrip()[:-1] + b', "__metadata__": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    f.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])
    assert_refused(verify(sandbox, *pair), sandbox, 1, says="nests JSON")


def test_verify_npz_lying_about_its_size(pair, sandbox):
    source = sandbox.root / "vit.npz"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("params/embedding/kernel.npy", npy(np.zeros((4, 4, 3, 48), np.float32)))
    data = bytearray(source.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)
    source.write_bytes(bytes(data))
    assert_refused(verify(sandbox, source, pair[0]), sandbox, 1, says="more than deflate can expand to")


def test_probe_source_without_weights(sandbox):
    empty = sandbox.root / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(
        json.dumps({"model": {"width": 48, "depth": 2, "mlp_dim": 80, "num_heads": 3, "patch_size": 4, "image_size": 16}})
    )
    assert_refused(probe(sandbox, empty), sandbox, 1, says="holds no weights")
