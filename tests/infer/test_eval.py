"""vitctl eval (vitctl.infer.evaluate): counts equal to a hand count of the model's own logits, both
twins on the same batches with no disagreement, every checkpoint format (vitctl-jax, vitctl-torch,
timm export, big_vision .npz, hf://) giving the same confusion matrix, the class-name check, the
confusion PNG, and every bad input as a clear error with no file left behind.

The models are random tiny ViTs; the data a small ImageFolder of PNGs of mixed sizes made here.
"""

import io
import json

import numpy as np
import pytest

from tests.conftest import random_params, tiny, torch_model
from vitctl import checkpoint as ckpt
from vitctl.formats import layout

pytest.importorskip("torch")
pytest.importorskip("jax")

# A classic ViT (class token, LayerNorm, sequential blocks): every format, big_vision's .npz included, can hold it.
CLASSIC = tiny(block="sequential", qk_norm=False, qkv_bias=True, norm="layernorm", norm_bias=True, gelu_approximate=True, pool="tok")
CLASSES = ("cat", "dog", "owl")


def write_jax(path, cfg, provenance=None, seed=0):
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, provenance or {"source_format": "test"})
    layout.save_jax(path, random_params(cfg, seed))
    return path


def write_torch(path, cfg, provenance=None, seed=0):
    from vitctl.convert.mapping import jax_to_torch

    path.mkdir(parents=True)
    layout.save_torch(path, jax_to_torch(random_params(cfg, seed), cfg))
    ckpt.write_config(path, cfg, provenance or {"source_format": "test"})
    return path


def photos(path, classes=CLASSES, per_class=10):
    """An ImageFolder: `per_class` random PNGs of mixed sizes per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (path / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = (20, 24) if i % 2 else (16, 18)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / c / f"{i}.png")
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return {"root": root, "photos": photos(root / "photos"), "torch": write_torch(root / "torch", tiny()),
            "jax": write_jax(root / "jax", tiny())}  # fmt: skip


def hand_count(ckpt_cfg, params, records):
    """(top-1 hits, top-5 hits, confusion) from the model's logits on each image decoded and prepared on its own."""
    import torch

    from vitctl.data.preprocess import prepare
    from vitctl.data.sources.images import decode

    model = torch_model(ckpt_cfg, params)
    confusion = np.zeros((records.num_classes, ckpt_cfg.num_classes), int)
    top5 = 0
    for i in range(len(records)):
        data, label = records[i]
        x = prepare(decode(io.BytesIO(data), ckpt_cfg.channels)[None], ckpt_cfg)
        with torch.inference_mode():
            logits = model(torch.from_numpy(x).permute(0, 3, 1, 2))[0][0].numpy()
        order = np.argsort(-logits, kind="stable")
        confusion[label, order[0]] += 1
        top5 += label in order[:5]
    return np.trace(confusion), top5, confusion


def test_counts_equal_a_hand_count_of_the_models_logits(made):
    from vitctl.data.lazy import open_records
    from vitctl.infer.evaluate import evaluate

    r = evaluate(made["torch"], str(made["photos"]), split="train", batch_size=5)  # 24 images: the last batch padded
    records = open_records(str(made["photos"]), "train", channels=3)
    top1, top5, confusion = hand_count(tiny(), random_params(tiny()), records)
    assert (r["backend"], r["checkpoint"]["format"], r["num_examples"], r["top_k"]) == ("torch", "vitctl-torch", 24, 5)
    assert r["results"]["torch"]["confusion_matrix"] == confusion.tolist()
    assert (r["results"]["torch"]["correct"], r["results"]["torch"]["correct_top5"]) == (top1, top5)
    assert r["top1"] == top1 / 24 and r["top5"] == top5 / 24 and 0 < top5 < 24  # neither trivially 0 nor 1
    assert r["class_counts"] == [8, 8, 8] and r["class_names"] == list(CLASSES) and r["class_names_check"] == "data only"
    per = r["results"]["torch"]["per_class"]
    assert [p["correct"] for p in per] == np.diagonal(confusion).tolist() and per[1]["accuracy"] == confusion[1, 1] / 8
    assert r["images_per_s"]["end_to_end"] > 0 and r["timings"]["model"]["torch"] > 0 and r["precision"] == "fp32"


def test_both_backends_run_the_same_batches_and_agree(made):
    from vitctl.infer.evaluate import evaluate

    r = evaluate(made["jax"], str(made["photos"]), split="train", backend="both", batch_size=7)
    jax_, torch_ = r["results"]["jax"], r["results"]["torch"]
    assert r["backend"] == "both" and r["agreement"]["disagreements"] == 0 and r["agreement"]["max_abs_logits_diff"] < 1e-4
    assert jax_ == torch_ and r["top1"] == jax_["top1"]
    assert set(r["timings"]["model"]) == {"jax", "torch"} and set(r["images_per_s"]["model"]) == {"jax", "torch"}
    assert set(r["timings"]["compile"]) == {"jax"}  # timed apart from the model's images/s


def test_every_format_gives_the_same_counts(tmp_path, made):
    """One set of weights as vitctl-jax, vitctl-torch, a timm export and a big_vision .npz: the same matrix."""
    from vitctl.convert.big_vision import to_big_vision
    from vitctl.convert.convert import convert
    from vitctl.data.lazy import open_records
    from vitctl.infer.evaluate import evaluate
    from vitctl.params import unstack

    jax_dir = write_jax(tmp_path / "jax", CLASSIC)
    convert(jax_dir, tmp_path / "timm", "jax-to-torch", target_format="timm")
    np.savez(tmp_path / "vit.npz", **{to_big_vision(k): v for k, v in unstack(random_params(CLASSIC), CLASSIC.depth)})
    want = hand_count(CLASSIC, random_params(CLASSIC), open_records(str(made["photos"]), "train"))
    got = {}
    for path in (jax_dir, write_torch(tmp_path / "torch", CLASSIC), tmp_path / "timm", tmp_path / "vit.npz"):
        r = evaluate(path, str(made["photos"]), split="train")
        got[r["checkpoint"]["format"]] = r["results"][r["backend"]]["confusion_matrix"]
    assert set(got) == {"vitctl-jax", "vitctl-torch", "timm", "big_vision"}
    assert all(m == want[2].tolist() for m in got.values()), got


def test_a_hugging_face_dir_counts_as_transformers_predicts(tmp_path, made):
    """A transformers ViTForImageClassification directory: eval's counts are those of transformers' own model
    on the same prepared images, and its id2label is checked against the data's class names."""
    transformers = pytest.importorskip("transformers")
    import torch

    from vitctl.data.lazy import open_records
    from vitctl.data.preprocess import prepare
    from vitctl.data.sources.images import decode
    from vitctl.infer.evaluate import evaluate
    from vitctl.open import open_checkpoint

    hub = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                                 patch_size=4, num_labels=3, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(hub).eval()
    with torch.no_grad():  # HF's init (std 0.02) gives every image the same class: spread the weights out
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "hf")
    r = evaluate(tmp_path / "hf", str(made["photos"]), split="train")
    with open_checkpoint(tmp_path / "hf") as ck:
        cfg = ck.cfg
    records = open_records(str(made["photos"]), "train")
    want = np.zeros((3, 3), int)
    for i in range(len(records)):
        data, label = records[i]
        x = torch.from_numpy(prepare(decode(io.BytesIO(data), 3)[None], cfg)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            want[label, int(model(pixel_values=x).logits.argmax())] += 1
    assert r["checkpoint"]["format"] == "hf" and r["results"]["torch"]["confusion_matrix"] == want.tolist()
    assert r["class_names_check"] == "agree" and r["top_k"] == 3 and r["top3"] == 1.0


def test_an_hf_uri_through_the_loopback_hub(tmp_path, made):
    pytest.importorskip("huggingface_hub")
    from tests.hub.conftest import TOKEN, repo_files
    from tests.hub.conftest import vitctl as runner
    from tests.hub.server import serve

    server, thread = serve(token=TOKEN)
    try:
        sha = server.seed("me/tiny", repo_files(made["torch"]))
        run = runner.__wrapped__(server, tmp_path)
        r = run("eval", f"hf://me/tiny@{sha}", "--data", made["photos"], "--json", timeout=300)
    finally:
        server.release_all()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert r.returncode == 0, r.stderr
    from vitctl.infer.evaluate import evaluate

    local = evaluate(made["torch"], str(made["photos"]))
    got = json.loads(r.stdout)
    assert got["checkpoint"]["format"] == "vitctl-torch" and got["results"] == local["results"]


def test_cli_prints_tables_and_draws_the_confusion_png(cli, made, tmp_path):
    from PIL import Image

    png = tmp_path / "confusion.png"
    r = cli("eval", made["jax"], "--data", made["photos"], "--backend", "both", "--confusion", png)
    assert r.returncode == 0, r.stderr
    assert "Accuracy" in r.stdout and "Per class" in r.stdout and "owl" in r.stdout and "0 top-1 disagreement(s)" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["confusion.png"]
    with Image.open(png) as im:
        im.verify()
        assert im.size[0] >= 400 and im.size[1] >= 200  # 3 true classes x 10 predicted: wide and low
    r = cli("eval", made["torch"], "--data", made["photos"], "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert np.sum(out["results"]["torch"]["confusion_matrix"]) == out["num_examples"] == sum(out["class_counts"]) == 6
    assert out["confusion_png"] is None and out["split"] == "test" and out["data"] == str(made["photos"])


def test_class_names_are_checked_against_the_checkpoints(cli, tmp_path, made):
    """Names recorded by training (fewer than the head: the rest by index), kept along a conversion, or in another order."""
    from vitctl.convert.convert import convert

    agree = write_torch(tmp_path / "agree", tiny(), {"source_format": "test", "class_names": list(CLASSES)})
    convert(agree, tmp_path / "converted", "torch-to-jax")  # the names now in its source_provenance
    for path in (agree, tmp_path / "converted"):
        r = cli("eval", path, "--data", made["photos"], "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["class_names_check"] == "agree" and "note:" not in r.stderr, r.stderr
    differ = write_torch(tmp_path / "differ", tiny(), {"source_format": "test", "class_names": ["dog", "cat", "owl"]})
    r = cli("eval", differ, "--data", made["photos"], "--confusion", tmp_path / "c.png")
    assert r.returncode == 0 and "DIFFER" in r.stdout
    assert "differ from the checkpoint's at 2 of 3 indices (0: data 'cat' vs checkpoint 'dog'" in " ".join(r.stderr.split())
    bad = write_torch(tmp_path / "bad", tiny(), {"source_format": "test", "class_names": [f"c{i}" for i in range(11)]})
    r = cli("eval", bad, "--data", made["photos"], "--json")
    assert json.loads(r.stdout)["class_names_check"] == "data only" and "not a list of at most 10 strings" in r.stderr


def test_many_classes_a_short_table_a_small_drawing_and_a_refusal(cli, tmp_path, made):
    from vitctl.errors import ConfigError
    from vitctl.infer.evaluate import evaluate, plot_confusion

    rng = np.random.default_rng(0)
    wide = write_torch(tmp_path / "wide", tiny(num_classes=101))
    np.savez(tmp_path / "many.npz", images=rng.integers(0, 256, (90, 8, 8, 3), np.uint8), labels=np.arange(90) % 45)
    r = cli("eval", wide, "--data", tmp_path / "many.npz", "--split", "train")
    assert r.returncode == 0 and "the 40 lowest of 45 (--json has every class)" in " ".join(r.stdout.split()), r.stderr
    assert sum(line.startswith("│") for line in r.stdout.splitlines()) == 1 + 40  # the accuracy row, 40 class rows
    (tmp_path / "many.npz").unlink()
    plot_confusion(rng.integers(0, 9, (60, 60)), [f"class {i}" for i in range(60)], [str(i) for i in range(60)], tmp_path / "big.png", "t")
    assert (tmp_path / "big.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="101 classes are too many to plot"):
        evaluate(wide, str(made["photos"]), confusion=tmp_path / "wide.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "wide"]


def test_bad_input_is_a_clear_error_and_leaves_no_file(cli, tmp_path, made):
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.png").write_bytes(b"mine")
    bad = photos(tmp_path / "bad", per_class=5)
    (bad / "dog" / "3.png").write_bytes(b"not a png")  # in the train split
    four = photos(tmp_path / "four", ("a", "b", "c", "d"), per_class=5)
    Image.new("RGB", (8, 8)).save(four / "d" / "0.png")
    np.savez(tmp_path / "empty.npz", x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.arange(4) % 2,
             x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, int))  # fmt: skip
    headless = write_torch(tmp_path / "headless", tiny(num_classes=0))
    three = write_torch(tmp_path / "three", tiny(num_classes=3))
    png = ("--confusion", out / "c.png")
    cases = [
        ((three, "--data", four, *png), 1, "has 4 classes but the model's head has 3"),
        ((headless, "--data", made["photos"], *png), 2, "has no classification head (num_classes 0)"),
        ((made["torch"], "--data", tmp_path / "empty.npz", *png), 1, "the test split is empty"),
        ((made["torch"], "--data", made["photos"], "--split", "val", *png), 2, "unknown split 'val'"),
        ((made["torch"], "--data", made["photos"], "--batch-size", "0", *png), 2, "--batch-size must be positive"),
        ((made["torch"], "--data", made["photos"], "--workers", "-1", *png), 2, "--workers must be 0 or more"),
        ((made["torch"], "--data", bad, "--split", "train", *png), 1, "3.png"),
        ((made["torch"], "--data", made["photos"], "--confusion", out / "taken.png"), 2, "taken.png already exists"),
        ((made["torch"], "--data", made["photos"], "--confusion", out / "no" / "c.png"), 1, "is not a directory"),
        ((tmp_path / "absent", "--data", made["photos"]), 2, "no such file or directory"),
    ]
    for args, code, message in cases:
        r = cli("eval", *args)
        assert r.returncode == code and message in " ".join(r.stderr.split()), (args, r.returncode, r.stderr)
        assert "Error:" in r.stderr and "Hint:" in r.stderr and "Traceback" not in r.stderr and r.stdout == "", args
        assert sorted(p.name for p in out.iterdir()) == ["taken.png"], args
        assert (out / "taken.png").read_bytes() == b"mine"
