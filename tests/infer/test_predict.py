"""`vitctl predict`: the top-k of every image equals the model's own logits ranked, on both backends and
for every format (vitctl-jax, vitctl-torch, timm, big_vision .npz); the images are the arrays eval's
data path gives; class names along the lineage, else indices; unreadable images skipped and counted,
--strict refuses and writes nothing; the CSV and the --json object round-trip.

Checkpoints are random tiny models (16 px, 10 classes) written here; images are 20 x 24 PNGs, so
every one is resized as a photo would be.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli.conftest import cli  # noqa: F401  (the CLI fixture)
from tests.conftest import jax_model, random_params, tiny, torch_model

torch = pytest.importorskip("torch")
pytest.importorskip("jax")

NAMES = [f"class-{i}" for i in range(10)]


def torch_ckpt(path: Path, cfg, provenance: dict) -> Path:
    from vitctl import checkpoint as ckpt
    from vitctl.convert.mapping import jax_to_torch
    from vitctl.formats import layout

    path.mkdir()
    layout.save_torch(path, jax_to_torch(random_params(cfg), cfg))
    ckpt.write_config(path, cfg, provenance)
    return path


def jax_ckpt(path: Path, cfg, provenance: dict) -> Path:
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout

    path.mkdir()
    ckpt.write_config(path, cfg, provenance)
    layout.save_jax(path, random_params(cfg))
    return path


def write_photos(root: Path, per_class: int = 5) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Checkpoints of one set of random weights in four formats, and an image folder (photos/train/<class>/*.png)."""
    from vitctl.config import ViTConfig
    from vitctl.convert.big_vision import to_big_vision
    from vitctl.convert.convert import convert
    from vitctl.params import unstack

    root = tmp_path_factory.mktemp("predict")
    cfg = tiny()
    out = {
        "torch": torch_ckpt(root / "torch", cfg, {"source_format": "test", "class_names": NAMES}),
        "jax": jax_ckpt(root / "jax", cfg, {"source_format": "test"}),
        "photos": write_photos(root / "photos" / "train").parent,
    }
    named = jax_ckpt(root / "jax-named", cfg, {"source_format": "test", "class_names": NAMES})
    convert(named, root / "timm", "jax-to-torch", target_format="timm")
    out["timm"] = root / "timm"
    bv = ViTConfig.from_variant("mu/16", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, num_classes=10)
    np.savez(root / "bv.npz", **{to_big_vision(k): v for k, v in unstack(random_params(bv), bv.depth)})
    out["npz"], out["bv_cfg"] = root / "bv.npz", bv
    return out


def decoded(files) -> np.ndarray:
    """uint8 [B, H, W, 3] straight from PIL: the reference input, prepared by data.preprocess.prepare."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def reference_logits(backend: str, cfg, params, files) -> np.ndarray:
    from vitctl.data.preprocess import prepare

    x = prepare(decoded(files), cfg)
    if backend == "torch":
        with torch.inference_mode():
            return torch_model(cfg, params)(torch.from_numpy(x).permute(0, 3, 1, 2))[0].numpy()
    import jax.numpy as jnp

    return np.asarray(jax_model(cfg, params)(jnp.asarray(x))[0])


def check_topk(result, logits: np.ndarray, k: int, probs: str = "softmax") -> None:
    z = logits.astype(np.float64)
    p = (
        1 / (1 + np.exp(-z))
        if probs == "sigmoid"
        else np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    )
    assert len(result["predictions"]) == len(logits)
    for pred, row, prow in zip(result["predictions"], logits, p, strict=True):
        assert [c["index"] for c in pred["topk"]] == list(np.argsort(-row)[:k])
        np.testing.assert_allclose([c["prob"] for c in pred["topk"]], prow[np.argsort(-row)[:k]], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_topk_is_the_models_own_ranking(made, backend):
    from vitctl.infer.predict import predict

    files = sorted((made["photos"] / "train").rglob("*.png"))
    r = predict(made["torch"], [made["photos"]], top_k=3, backend=backend, batch_size=4)  # 10 images: a short last batch
    assert [p["file"] for p in r["predictions"]] == [str(f) for f in files]
    check_topk(r, reference_logits(backend, tiny(), random_params(tiny()), files), 3)
    assert r["settings"]["backend"] == backend and r["images"] == 10 and r["skipped"] == [] and r["images_per_s"] > 0
    assert [c["label"] for c in r["predictions"][0]["topk"]] == [NAMES[c["index"]] for c in r["predictions"][0]["topk"]]


@pytest.mark.parametrize("fmt", ["jax", "timm", "npz"])
def test_every_format(made, fmt):
    from vitctl.infer.predict import predict

    files = [made["photos"] / "train" / "cat" / "0.png", made["photos"] / "train" / "dog" / "3.png"]
    r = predict(made[fmt], files, top_k=10, batch_size=2)
    cfg = made["bv_cfg"] if fmt == "npz" else tiny()
    backend = "torch" if fmt == "timm" else "jax"
    assert r["settings"]["backend"] == backend and r["settings"]["top_k"] == 10
    check_topk(r, reference_logits(backend, cfg, random_params(cfg), files), 10)
    labels = [c["label"] for c in r["predictions"][0]["topk"]]
    if fmt == "timm":  # converted from a checkpoint that recorded class names: kept along the lineage
        assert r["settings"]["labels"] == "class_names" and labels == [NAMES[c["index"]] for c in r["predictions"][0]["topk"]]
    else:
        assert r["settings"]["labels"] == "indices" and labels == [str(c["index"]) for c in r["predictions"][0]["topk"]]
        assert "the checkpoint records no class names: labels are class indices" in r["notes"]


def test_images_are_those_eval_feeds_the_model(made):
    """predict's prepared array of a file is eval_batches' array of the same file, bit for bit."""
    from vitctl.data.lazy import open_records
    from vitctl.data.pipeline import eval_batches
    from vitctl.infer.predict import list_images, prepare_file
    from vitctl.infer.runner import one_blas_thread

    cfg = tiny()
    records = open_records(str(made["photos"]), "train", channels=3)
    images = np.concatenate([x[v] for x, _, v in eval_batches(records, cfg, 4)])
    files, found = list_images([made["photos"] / "train"])
    assert found == [{"path": str(made["photos"] / "train"), "kind": "directory", "images": 10}]
    np.testing.assert_array_equal(np.stack([prepare_file(f, cfg) for f in files]), images)
    with one_blas_thread():  # as predict runs: the same numbers
        np.testing.assert_array_equal(np.stack([prepare_file(f, cfg) for f in files]), images)


def test_partial_names_and_sigmoid(made, tmp_path):
    """Fewer names than classes: the rest by index. A run trained with the sigmoid loss: per-class sigmoids."""
    from vitctl.infer.predict import predict

    ckpt = torch_ckpt(tmp_path / "ck", tiny(), {"source_format": "test", "class_names": ["cat", "dog"]})
    (ckpt / "train_config.json").write_text(json.dumps({"loss": "sigmoid"}))
    files = sorted((made["photos"] / "train").rglob("*.png"))[:3]
    r = predict(ckpt, files, top_k=10)
    check_topk(r, reference_logits("torch", tiny(), random_params(tiny()), files), 10, probs="sigmoid")
    assert r["settings"]["probabilities"] == "sigmoid" and any("sigmoid" in n for n in r["notes"])
    assert {c["index"]: c["label"] for c in r["predictions"][0]["topk"]} == {0: "cat", 1: "dog", **{i: str(i) for i in range(2, 10)}}


def bad_folder(root: Path, good: Path) -> Path:
    """Two good images and three bad ones: truncated JPEG, text named .png, an empty file."""
    from PIL import Image

    (root / "sub").mkdir(parents=True)
    im = Image.open(good).convert("RGB")
    im.save(root / "a.png")
    im.save(root / "sub" / "b.jpg", quality=95)
    data = (root / "sub" / "b.jpg").read_bytes()
    (root / "c-truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "d-text.png").write_text("not an image\n")
    (root / "e-empty.jpg").write_bytes(b"")
    (root / ".hidden.png").write_text("hidden files are not listed")
    return root


def test_bad_images_are_skipped_and_strict_refuses(made, tmp_path, cli):  # noqa: F811
    folder = bad_folder(tmp_path / "mixed", made["photos"] / "train" / "cat" / "0.png")
    r = cli("predict", made["torch"], folder, "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [p["file"] for p in out["predictions"]] == [str(folder / "a.png"), str(folder / "sub" / "b.jpg")]
    assert [s["file"] for s in out["skipped"]] == [str(folder / n) for n in ("c-truncated.jpg", "d-text.png", "e-empty.jpg")]
    assert out["inputs"] == [{"path": str(folder), "kind": "directory", "images": 5}] and out["images"] == 2
    assert all("cannot decode image" in s["error"] for s in out["skipped"])
    r = cli("predict", made["torch"], folder, "--csv", tmp_path / "p.csv")
    assert r.returncode == 0 and "3 skipped" in r.stdout and r.stderr.count("skipped:") == 3, r.stderr

    r = cli("predict", made["torch"], folder, "--strict", "--csv", tmp_path / "strict.csv")
    assert r.returncode == 1 and "c-truncated.jpg" in r.stderr and "--strict" in r.stderr
    assert not (tmp_path / "strict.csv").exists() and [p.name for p in tmp_path.iterdir() if "strict" in p.name] == []


def test_missing_and_empty_inputs_are_clear_errors(made, tmp_path, cli):  # noqa: F811
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    r = cli("predict", made["torch"], tmp_path / "empty")
    assert r.returncode == 1 and f"no image files in {tmp_path / 'empty'}" in r.stderr
    r = cli("predict", made["torch"], tmp_path / "nope.jpg")
    assert r.returncode == 1 and "no such file or directory" in r.stderr
    r = cli("predict", made["torch"], made["photos"], "--top-k", "0")
    assert r.returncode == 2 and "--top-k must be 1 or more" in r.stderr
    (tmp_path / "taken.csv").write_text("mine")
    r = cli("predict", made["torch"], made["photos"], "--csv", tmp_path / "taken.csv")
    assert r.returncode == 2 and "already exists" in r.stderr and (tmp_path / "taken.csv").read_text() == "mine"


def test_csv_and_json_round_trip(made, tmp_path, cli):  # noqa: F811
    from vitctl.infer.predict import CSV_HEADER, read_csv

    r = cli("predict", made["torch"], made["photos"], "--json", "--top-k", "3", "--csv", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["csv"] == str(tmp_path / "p.csv") and len(out["predictions"]) == 10
    assert read_csv(tmp_path / "p.csv") == out["predictions"]  # probabilities written as repr: exact
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == ",".join(CSV_HEADER) and len(lines) == 1 + 10 * 3 and lines[1].startswith(f"{out['predictions'][0]['file']},1,")
    table = cli("predict", made["torch"], made["photos"] / "train" / "cat" / "0.png", "--top-k", "2")
    assert table.returncode == 0 and "Top-2 predictions" in table.stdout and "found 1 image file" in table.stderr
    first = out["predictions"][0]["topk"][0]
    assert f"{first['label']} {first['prob']:.1%}" in table.stdout
