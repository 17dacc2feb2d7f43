"""Transfer end to end through the real CLI: a Hugging Face ViT fetched from the (loopback) Hub,
fine-tuned at a new resolution with a new head, then carried on through the existing commands
unchanged: convert (both directions), verify, probe, and hub push with a card that names the
init source."""

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from tests.hub.test_hub import no_token

SRC_REPO, OUT_REPO = "someone/vit-hf-tiny", "me/vit-finetuned"


def hf_vit(path: Path) -> dict[str, bytes]:
    """A ViTForImageClassification with random weights, saved by transformers itself: 16 px, 4 classes."""
    import torch

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, num_channels=3, num_labels=4)  # fmt: skip
    transformers.ViTForImageClassification(cfg).save_pretrained(path)
    return {f.name: f.read_bytes() for f in path.iterdir() if f.is_file()}


def data(path: Path, n: int = 48, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, (n, 24, 24, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, :, c * 8 : c * 8 + 8] = 255  # a bright band per class: learnable
    np.savez(path, images=images, labels=labels)
    return path


def test_hf_model_from_the_hub_fine_tunes_and_goes_on(hub, vitctl, tmp_path):
    sha = hub.seed(SRC_REPO, hf_vit(tmp_path / "hf-src"))
    source = f"hf://{SRC_REPO}@{sha}"
    ft, pt, back = tmp_path / "ft", tmp_path / "ft-pt", tmp_path / "ft-jax"
    npz = data(tmp_path / "data.npz")

    r = vitctl("train", "--init-from", source, "--data", npz, "--num-classes", "3", "--image-size", "24",
               "--steps", "3", "--batch-size", "8", "--out", ft, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 3 and cfg["model"]["image_size"] == 24 and cfg["model"]["class_posemb"]
    assert source in json.dumps(cfg["provenance"])  # the resolved source, pinned to its commit

    for args in (("convert", "jax-to-torch", ft, pt), ("verify", ft, pt, "--batch", "1"),
                 ("convert", "torch-to-jax", pt, back), ("verify", pt, back, "--batch", "1"),
                 ("probe", ft, "--data", npz, "--mode", "fewshot", "--shots", "1,5", "--seeds", "1", "--json")):  # fmt: skip
        r = vitctl(*args, timeout=600)
        assert r.returncode == 0, (args, r.stderr)

    push = vitctl("hub", "push", pt, OUT_REPO, "--json")
    assert push.returncode == 0, push.stderr
    card = hub.content(OUT_REPO, "main", "README.md").decode()
    assert SRC_REPO in card and sha in card  # the card names the init source
    assert str(tmp_path) not in card
    no_token(r, push)
