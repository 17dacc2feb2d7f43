"""`vitctl train --init-from`: weights loaded straight into the sharded model from every format
the door reads, bit for bit; a new head, a new resolution; the run's first loss is the source
model's loss on that batch; provenance; clear refusals through the CLI.

8 simulated CPU devices (tests/conftest.py), mesh data=2,fsdp=2,tensor=2.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from tests.golden import CLASSIC
from tests.train import standin
from vitctl import params as ptable
from vitctl.config import ViTConfig
from vitctl.train.settings import TrainConfig

MESH = "data=2,fsdp=2,tensor=2"
# Every sharded dimension divides over the mesh (D=48, N=4, F=96); L=3 so that stacked block
# parameters have layers to pick from.
MODEL = ViTConfig(width=48, depth=3, mlp_dim=96, num_heads=4, patch_size=4, image_size=16, num_classes=4, head_zero_init=False)
CLASSIC_MODEL = dataclasses.replace(MODEL, **CLASSIC)
HF_MODEL = dataclasses.replace(CLASSIC_MODEL, class_posemb=True, gelu_approximate=False, norm_eps=1e-12)  # what HF's ViT computes


def write_jax(path: Path, cfg: ViTConfig, seed: int = 0) -> Path:
    from vitctl import checkpoint
    from vitctl.formats import layout

    path.mkdir(parents=True)
    layout.save_jax(path, ptable.random_weights(cfg, seed))
    checkpoint.write_config(path, cfg, {"source_format": "test", "source": "random_weights"})
    return path


def convert(src: Path, dst: Path, *extra: str) -> Path:
    from vitctl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["convert", "jax-to-torch", str(src), str(dst), *extra])
    assert (e.value.code or 0) == 0
    return dst


def write_npz(path: Path, cfg: ViTConfig) -> Path:
    from tests.convert import bv_reference as ref

    model = ref.ViT(num_classes=cfg.num_classes, patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth, mlp_dim=cfg.mlp_dim,
                    num_heads=cfg.num_heads, pool_type="tok", scan=False, posemb="learn")  # fmt: skip
    ref.save_npz(path, ref.random_params(model, cfg.image_size, 0), prefix="params/img/")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    jax_src = write_jax(root / "jax", MODEL)
    classic = write_jax(root / "classic", CLASSIC_MODEL, seed=1)
    return {
        "vitctl-jax": (jax_src, None),
        "vitctl-torch": (convert(jax_src, root / "torch", "--max-shard-size", "40KB"), None),  # sharded safetensors
        "timm": (convert(classic, root / "timm", "--format", "timm"), None),
        "big_vision": (write_npz(root / "bv.npz", CLASSIC_MODEL), "params/img"),
        "hf": (convert(write_jax(root / "for-hf", HF_MODEL, seed=2), root / "hf", "--format", "hf"), None),  # transformers' ViT
    }


def setup_for(cfg: ViTConfig, **kw):
    from vitctl.train.distributed import mesh_for
    from vitctl.train.step import get_setup

    return get_setup(cfg, TrainConfig(mesh=MESH, batch_size=8, **kw), mesh_for(MESH))


def open_source(path, prefix=None):
    from vitctl.train.init_from import open_source as open_

    return open_(TrainConfig(init_from=str(path), prefix=prefix))


@pytest.mark.parametrize("fmt", ["vitctl-jax", "vitctl-torch", "timm", "big_vision", "hf"])
def test_loaded_params_equal_the_checkpoints_bit_for_bit(sources, fmt):
    import jax

    from vitctl.formats import layout
    from vitctl.train.init_from import load_into

    path, prefix = sources[fmt]
    with open_source(path, prefix) as ckpt:
        assert ckpt.format == fmt
        want = ptable.stack(ckpt.params(), ckpt.cfg.depth)
        ckpt.read_log = []
        setup = setup_for(ckpt.cfg)
        loaded, plan = load_into(ckpt, ckpt.cfg, setup.abstract["params"])
        log = ckpt.read_log
    assert not plan.new and not plan.resampled and not plan.dropped
    flat = layout.flatten(loaded)
    assert set(flat) == set(want)
    for name, arr in flat.items():
        assert arr.sharding == layout.flatten(setup.param_shardings)[name], name
        got = np.asarray(jax.device_get(arr))
        assert got.dtype == want[name].dtype and np.array_equal(got, want[name]), name
    # Each distinct shard is read once: the bytes read are the model's, not 8 devices' copies. Every
    # format but the .npz (zip members, read whole once) is read a shard at a time.
    assert sum(n for _, _, n in log) == sum(w.nbytes for w in want.values())
    # FSDP/tensor shards: stacked block kernels are read a slice of a layer at a time.
    q = [idx for n, idx, _ in log if n == "blocks/1/q/kernel"]
    assert len(q) == 4 and all(idx[0] != slice(None) or idx[1] != slice(None) for idx in q)
    assert (ckpt._whole is None) == (fmt != "big_vision")


def test_new_head_and_new_resolution(sources):
    import jax
    from flax import nnx

    from vitctl.formats import layout
    from vitctl.posemb import resample_posemb
    from vitctl.train.init_from import load_into, run_config

    path, _ = sources["vitctl-torch"]
    with open_source(path) as ckpt:
        tcfg = TrainConfig(init_from=str(path), image_size=24, num_classes=6, mesh=MESH)
        cfg = run_config(tcfg, ckpt.cfg, 8, 4, ckpt.what)
        assert (cfg.image_size, cfg.num_classes, cfg.width, cfg.depth) == (24, 6, 48, 3)
        setup = setup_for(cfg)
        for method in ("bilinear", "bicubic"):
            loaded, plan = load_into(ckpt, cfg, setup.abstract["params"], posemb_resize=method)
            flat = {n: np.asarray(jax.device_get(a)) for n, a in layout.flatten(loaded).items()}
            assert flat["pos_embed"].shape == (1, 36, 48)
            np.testing.assert_array_equal(flat["pos_embed"], resample_posemb(ckpt.read_slice("pos_embed"), (6, 6), method=method))
        source_kernel = ckpt.read_slice("blocks/0/q/kernel")
    assert plan.new == ["head/kernel", "head/bias"] and plan.dropped == ["head/kernel", "head/bias"]
    assert any("not loaded" in m for m in plan.messages) and any("resampled" in m for m in plan.messages)
    assert not flat["head/kernel"].any() and not flat["head/bias"].any()
    assert np.array_equal(flat["blocks/q/kernel"][0], source_kernel)
    x = np.random.default_rng(0).normal(size=(8, 24, 24, 3)).astype(np.float32)
    logits, _ = nnx.merge(setup.graphdef, loaded)(jax.device_put(x, setup.images_sharding))
    assert logits.shape == (8, 6) and not np.asarray(logits).any()  # exactly 0 at step 0


def source_loss(ckpt, tcfg: TrainConfig, dataset) -> float:
    """The source model's loss on the first batch of a run with these settings (one device, unsharded)."""
    from vitctl.model_jax.model import init_model
    from vitctl.model_jax.state import load_flat_params
    from vitctl.train.optim import objective

    cfg = ckpt.cfg
    model = init_model(cfg)
    load_flat_params(model, ptable.stack(ckpt.params(), cfg.depth))
    loader = standin.Loader(
        dataset, cfg, tcfg.batch_size, seed=tcfg.seed, shuffle=True, drop_remainder=True, process_index=0, process_count=1
    )
    images, labels = next(iter(loader))
    logits, _ = model(images)  # (the stand-in loader hands out prepared images)
    return float(objective(logits, np.asarray(labels), cfg.num_classes, tcfg.loss))


def test_fine_tune_starts_at_the_source_models_loss(sources, tmp_path):
    from vitctl.train.loop import train

    path, _ = sources["vitctl-jax"]
    tcfg = TrainConfig(init_from=str(path), steps=2, batch_size=8, lr=1e-3, mesh=MESH, optimizer="sgd", layer_decay=0.75, stats_every=0)
    dataset, notes = standin.make_dataset(size=16), []
    out = tmp_path / "ft"
    r = train(tcfg, out, dataset=dataset, loader_cls=standin.Loader, prepare_fn=standin.prepare, notify=notes.append)
    assert r["steps"] == 2 and not notes  # same classes and size: nothing new, nothing resampled
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    with open_source(path) as ckpt:
        want = source_loss(ckpt, tcfg, dataset)
    np.testing.assert_allclose(first["loss"], want, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["depth"] == 3 and config["provenance"]["source"] == "jax"
    init = config["provenance"]["init_from"]
    assert init["source"] == "jax" and init["format"] == "vitctl-jax" and "revision" not in init
    assert "config.json" in init["sha256"] and all(len(h) == 64 for h in init["sha256"].values())
    assert str(tmp_path) not in (out / "config.json").read_text() and str(tmp_path) not in (out / "train_config.json").read_text()
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["init_from"] == str(path) and stored["init_source"] == init

    from vitctl.formats import layout
    from vitctl.hub.card import model_card

    files = {str(f.relative_to(out)): f for f in (out / "params").rglob("*") if f.is_file()}
    card = model_card(out, layout.read_checkpoint_config(out), "org/ft", files, None)
    assert "- Fine-tuned from `jax` (vitctl-jax) with `vitctl train --init-from`." in card

    # Resuming continues from the run's own state: the init weights are not read again.
    r = train(dataclasses.replace(tcfg, steps=3), out, resume=True, dataset=dataset, loader_cls=standin.Loader, prepare_fn=standin.prepare)
    assert r["steps"] == 3 and json.loads((out / "train_config.json").read_text())["init_source"] == init


def run_cli(capsys, *args):
    from vitctl.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code or 0, out, " ".join(err.split())


def test_refusals_through_the_cli(sources, tmp_path, capsys):
    pytest.importorskip("sklearn")
    import shutil

    from safetensors.numpy import load_file, save_file

    jax_src, out = sources["vitctl-jax"][0], tmp_path / "run"
    base = ["train", "--data", "digits", "--steps", "1", "--batch-size", "8", "--out", out]

    code, _, err = run_cli(capsys, *base, "--init-from", tmp_path / "nowhere")
    assert code == 2 and "--init-from: no such file or directory" in err and not out.exists()

    wide = tmp_path / "wide.json"
    wide.write_text(dataclasses.replace(MODEL, width=64, num_heads=4).to_json())
    code, _, err = run_cli(capsys, *base, "--init-from", jax_src, "--model", wide)
    assert code == 2 and "width: --model 64, checkpoint 48" in err and "leave --model out" in err and not out.exists()

    code, _, err = run_cli(capsys, *base, "--init-from", jax_src, "--freeze", "blocks/*", "--freeze", "nothing*")  # repeatable
    assert code == 2 and "--freeze 'nothing*' matches no parameter" in err and not out.exists()

    holed = tmp_path / "holed"  # a torch checkpoint with one tensor missing
    convert(jax_src, holed)
    state = load_file(holed / "model.safetensors")
    del state["blocks.1.q.weight"]
    save_file(state, holed / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, *base, "--init-from", holed)
    assert code != 0 and "blocks.1.q.weight" in err and "missing" in err and not out.exists()

    odd = tmp_path / "odd"  # an unknown pooling in the checkpoint's config
    shutil.copytree(jax_src, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model"]["pool"] = "avg"
    (odd / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, *base, "--init-from", odd)
    assert code == 2 and "avg" in err and not out.exists()

    resumed = tmp_path / "resumed"  # a run that started from another source
    resumed.mkdir()
    (resumed / "train_config.json").write_text(json.dumps(dataclasses.asdict(TrainConfig(init_from="other"))))
    code, _, err = run_cli(capsys, "train", "--out", resumed, "--resume", "--init-from", jax_src)
    assert code == 2 and "with --resume: the run in" in err and "it started from other" in err
    assert sorted(p.name for p in resumed.iterdir()) == ["train_config.json"]


def test_class_token_slot_is_kept_when_resampling(tmp_path):
    """timm / HF ViT sources: the position embedding's first row belongs to the class token; at a new
    resolution it is kept as it is and only the patch grid is resampled."""
    import jax

    from vitctl.formats import layout
    from vitctl.posemb import resample_posemb
    from vitctl.train.init_from import load_into, run_config

    source = dataclasses.replace(CLASSIC_MODEL, class_posemb=True, norm_pre=True, layer_scale=0.1)
    path = write_jax(tmp_path / "src", source)
    with open_source(path) as ckpt:
        cfg = run_config(TrainConfig(init_from=str(path), image_size=32), ckpt.cfg, 8, 4, ckpt.what)
        loaded, plan = load_into(ckpt, cfg, setup_for(cfg).abstract["params"], posemb_resize="bicubic")
        old = ckpt.read_slice("pos_embed")
        want = ptable.stack(ckpt.params(), ckpt.cfg.depth)
    got = {n: np.asarray(jax.device_get(a)) for n, a in layout.flatten(loaded).items()}
    assert old.shape == (1, 17, 48) and got["pos_embed"].shape == (1, 65, 48) and plan.resampled
    assert np.array_equal(got["pos_embed"][:, :1], old[:, :1])
    assert np.array_equal(got["pos_embed"], resample_posemb(old, (8, 8), prefix=1, method="bicubic"))
    for name in ("norm_pre/scale", "blocks/ls_attn/scale", "blocks/ls_mlp/scale", "head/kernel"):
        assert np.array_equal(got[name], want[name]), name


def test_init_from_an_hf_uri_records_the_revision(tmp_path):
    """`--init-from hf://org/name@rev` through the real CLI against a loopback Hub: fetched, loaded, and
    recorded by its public name, resolved revision, format and file hashes; no token anywhere."""
    pytest.importorskip("huggingface_hub")
    from tests.hub.conftest import TOKEN, repo_files, torch_ckpt
    from tests.hub.server import serve

    server, thread = serve(token=TOKEN)
    try:
        from tests.hub.conftest import vitctl as make_runner

        run = make_runner.__wrapped__(server, tmp_path)
        src = torch_ckpt(tmp_path / "src", max_shard_bytes=None)
        sha = server.seed("me/tiny", repo_files(src))
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "data.npz", images=rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8), labels=np.arange(40) % 2)
        out = tmp_path / "ft"
        r = run("train", "--init-from", f"hf://me/tiny@{sha}", "--data", tmp_path / "data.npz", "--steps", "1", "--batch-size", "8",
                "--out", out, "--json", timeout=300)  # fmt: skip
    finally:
        server.release_all()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert r.returncode == 0, r.stderr
    assert "new head for 2 classes (the checkpoint has 10)" in r.stderr
    init = json.loads((out / "config.json").read_text())["provenance"]["init_from"]
    assert init["source"] == f"hf://me/tiny@{sha}" and init["revision"] == sha and init["format"] == "vitctl-torch"
    assert set(init["sha256"]) == {"config.json", "model.safetensors"}
    stored = json.loads((out / "train_config.json").read_text())  # the run's own settings (local paths: resume needs them)
    assert stored["init_source"] == init and TOKEN not in json.dumps(stored)
    for text in (r.stdout, r.stderr, (out / "config.json").read_text()):  # what is published or shown
        assert TOKEN not in text and str(tmp_path) not in text.replace(str(out), "")


def test_a_timm_model_saved_by_timm_starts_at_timms_loss(tmp_path):
    """A foreign timm directory (timm's own save_for_hf, class token with a position row, timm's
    defaults): the fine-tuning run's first loss, on 8 devices, is timm's own model's loss on that batch."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from timm.models._hub import save_for_hf

    from vitctl.train.loop import train
    from vitctl.train.optim import objective

    args = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0, "num_classes": 4}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # off timm's init (zero biases, zero head)
    save_for_hf(model, tmp_path / "timm", model_args=args, safe_serialization=True)
    tcfg = TrainConfig(init_from=str(tmp_path / "timm"), steps=1, batch_size=8, lr=1e-3, mesh=MESH, stats_every=0)
    dataset = standin.make_dataset(size=16)
    out = tmp_path / "ft"
    train(tcfg, out, dataset=dataset, loader_cls=standin.Loader, prepare_fn=standin.prepare)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    cfg = json.loads((out / "config.json").read_text())
    images, labels = next(iter(standin.Loader(dataset, ViTConfig.from_dict(cfg["model"]), 8)))
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
    np.testing.assert_allclose(first, float(objective(logits, labels, 4)), rtol=1e-5)
    assert cfg["model"]["class_posemb"] and cfg["provenance"]["init_from"]["format"] == "timm"
