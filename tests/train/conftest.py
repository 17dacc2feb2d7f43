"""The reference run shared by the multi-process, robustness and full-run tests of tests/train.

One process, the 8 simulated devices of tests/conftest.py on the mesh data=2,fsdp=2,tensor=2,
digits, Adafactor + sigmoid cross-entropy + cosine with cooldown (tests/train/mp_child.py's
config). Package-scoped: trained once; runs with the same settings in this process reuse its
compiled Setup (vitctl.train.step.get_setup).
"""

import pytest

from vitctl.config import ViTConfig

# Two dims >= 128 (optax's min_dim_size_to_factor), so Adafactor factors the MLP kernels.
MP_MODEL = ViTConfig(width=128, depth=1, mlp_dim=256, num_heads=4, patch_size=4, image_size=16, num_classes=10, head_zero_init=False)


@pytest.fixture(scope="package")
def reference(tmp_path_factory):
    pytest.importorskip("optax")
    pytest.importorskip("orbax.checkpoint")
    pytest.importorskip("sklearn")
    from tests.train.mp_child import config
    from vitctl.train.loop import train

    root = tmp_path_factory.mktemp("reference")
    (root / "model.json").write_text(MP_MODEL.to_json())
    tcfg = config(str(root / "model.json"))
    return {"root": root, "model": str(root / "model.json"), "tcfg": tcfg, "result": train(tcfg, root / "run"), "out": root / "run"}
