"""Every `--help` Examples block runs as written, and no help text has a typo the eye skips.

The examples are read from the app itself (each command's epilog in vitctl/cli/*.py). Each
runs in its own fresh sandbox (tests/docs/conftest.py: the loopback Hub as HF_ENDPOINT, a
token, HF_USER=me), with bash, exactly as printed. What it reads is made there first, under
the names the example uses (INPUTS: small checkpoints, a big_vision .npz, an image folder, a
Hub repo), so an example about `ckpt/22b` runs on a small checkpoint of that name. An
example with `--process-id 0` runs with its partner `--process-id 1`, concurrently.

An example that cannot run here as written is in INSTEAD, with what runs in its place (or
where it is covered) and why.
A listed example that no longer exists fails the test, so the table cannot go stale.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import typer
from rich.text import Text

from tests.docs.conftest import HF_USER, Sandbox
from tests.hub.conftest import TOKEN, repo_files
from tests.hub.server import HubServer

pytest.importorskip("jax")
pytest.importorskip("torch")
pytest.importorskip("huggingface_hub")


def walk(cmd, path=()):
    """(command path, click command) of every leaf command."""
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from walk(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def click_app():
    from vitctl.cli import app

    return typer.main.get_command(app)


def examples() -> list[tuple[str, str]]:
    """(command, example line) of every Examples epilog."""
    out = []
    for name, cmd in walk(click_app()):
        text = cmd.epilog or ""
        assert text.startswith("Examples:"), f"`vitctl {name}` has no Examples epilog"
        out += [(name, line.strip()) for line in text.splitlines()[1:] if line.strip()]
    return out


# Example -> (what runs instead, or "" for nothing here; why). Keep it short and honest.
INSTEAD: dict[str, tuple[str, str]] = {
    "vitctl demo": ("", "300 training steps (~2 min of CPU): tests/cli/test_demo.py runs `vitctl demo --out DIR --steps 6`"),
    "vitctl demo --out /tmp/vitctl-demo --force": ("", "writes outside the sandbox; tests/cli/test_demo.py runs --out DIR --force"),
    "vitctl demo --steps 20 --json": ("", "tests/cli/test_demo.py runs `vitctl demo --out DIR --steps 6 --force --json`"),
    "vitctl bench --quick": ("vitctl bench --quick --only cli", "the whole --quick run takes minutes; tests/test_bench.py runs every part"),
    "vitctl bench --json > bench.json": (
        "vitctl bench --quick --json --only cli > bench.json",
        "the full run takes about 8 minutes; tests/test_bench.py runs every part at the tiny size",
    ),
    "vitctl train --out runs/digits --resume --steps 400": (
        "vitctl train --out runs/digits --resume --steps 4",
        "the same resume of the run made first (2 steps), to 4 steps instead of 400 (a minute of CPU)",
    ),
    "vitctl demo --endpoint http://127.0.0.1:8080 --repo-id me/vitctl-demo": (
        "", "300 training steps; tests/cli/test_demo.py pushes the demo to the loopback Hub (--endpoint, --repo-id)"),
    "vitctl train --model vit22b-demo/4 --data digits --out runs/digits --steps 200": (
        "vitctl train --model vit22b-demo/4 --data digits --out runs/digits --steps 20",
        "the same run, 20 steps instead of 200 (40 CPU-s)",
    ),
    "vitctl train --model vit22b-demo/4 --data digits --out runs/digits-mesh --mesh data=2,fsdp=2,tensor=2": (
        "vitctl train --model vit22b-demo/4 --data digits --out runs/digits-mesh --mesh data=2,fsdp=2,tensor=2 --steps 10",
        "the same run on the 8-device mesh, 10 steps instead of the default 100",
    ),
    "vitctl train --data digits --out /shared/runs/r2 --mesh data=2,fsdp=4 --coordinator 10.0.0.1:5476 --num-processes 2 --process-id 0": (
        "",
        (
            "a second host (10.0.0.1, /shared); tests/train/test_multiprocess.py runs 2 processes on loopback (and this "
            "harness runs a `--process-id 0` example with its partner when one names a loopback coordinator)"
        ),
    ),
    "torchrun --nproc-per-node 2 -m vitctl train --backend torch --model vit22b-demo/4 --data digits --out runs/torch --steps 200": (
        "",
        (
            "two torch processes for minutes of CPU; tests/train/test_torch_train.py runs `torchrun --nproc-per-node 2 -m vitctl "
            "train --backend torch ... --steps 2 --json` on a tiny model"
        ),
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- inputs
def tiny(**overrides):
    from vitctl.config import ViTConfig

    small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 4, "image_size": 16, "num_classes": 10}
    return ViTConfig.from_variant("vit22b-mu/16", **{**small, **overrides})


def jax_ckpt(path: Path, cfg=None, seed: int = 0) -> None:
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout
    from vitctl.params import random_weights

    cfg = cfg or tiny()
    path.mkdir(parents=True)
    ckpt.write_config(path, cfg, {"source_format": "test", "source": "random_weights", "seed": seed})
    layout.save_jax(path, random_weights(cfg, seed))


def converted(src: str, **options):
    def make(box: Sandbox, dst: Path) -> None:
        from vitctl.convert.convert import convert

        convert(box.root / src, dst, "jax-to-torch", **options)

    return make


def torch_ckpt(box: Sandbox, path: Path) -> None:
    jax_ckpt(box.root / "_src", seed=1)
    converted("_src")(box, path)


def big_vision_npz(box: Sandbox, path: Path) -> None:
    """A classic big_vision ViT (16 px, 3 channels) as big_vision writes it: "/"-named leaves in np.savez."""
    from vitctl.config import ViTConfig
    from vitctl.convert.big_vision import to_big_vision
    from vitctl.params import random_weights, unstack

    cfg = ViTConfig.from_variant("mu/16", width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, num_classes=10)
    np.savez(path, **{to_big_vision(k): v for k, v in unstack(random_weights(cfg), cfg.depth)})


def photos(box: Sandbox, path: Path) -> None:
    """An image folder: 2 classes x 16 small PNGs (enough for 10-shot after the held-out fifth)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (path / c).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path / c / f"{i}.png")


def classic_jax(box: Sandbox, path: Path) -> None:
    """A small classic ViT with a class-token position (as HF's and timm's): what --format hf can express."""
    from vitctl.config import ViTConfig

    small = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "patch_size": 4, "image_size": 16, "num_classes": 10}
    jax_ckpt(path, ViTConfig.from_variant("mu/16", class_posemb=True, **small))


def hf_vit_repo(repo: str):
    """A transformers ViTForImageClassification (random weights, built here) on the loopback Hub as `repo`."""

    def make(box: Sandbox, _: Path) -> None:
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4, num_labels=3
        )
        ViTForImageClassification(cfg).save_pretrained(box.root / "_hf_vit")
        box.hub.seed(repo, repo_files(box.root / "_hf_vit"))

    return make


def write(text: str):
    return lambda box, path: path.write_text(text)


def hub_repo(repo: str, src: str = "_hub_src", branch: str | None = None):
    def make(box: Sandbox, _: Path) -> None:
        torch_ckpt(box, box.root / src)
        sha = box.hub.seed(repo, repo_files(box.root / src))
        if branch:
            box.hub.repos[repo].branches[branch] = sha

    return make


def shell(script: str):
    def make(box: Sandbox, _: Path) -> None:
        r = box.sh(script)
        assert r.returncode == 0, r.stderr

    return make


TINY_JSON = json.dumps(tiny().to_dict())
TRAIN_YAML = "model: vit22b-demo/4\ndata: digits\nsteps: 4\n"  # the example's settings file: a short run

# Example (or its start) -> [(path, maker)]: made in order before the example runs.
A = "vitctl verify ckpt/jax"
INPUTS: dict[str, list] = {
    "vitctl info ./ckpt/tiny": [("ckpt/tiny", lambda box, p: jax_ckpt(p))],
    "vitctl init --config tiny.json": [("tiny.json", write(TINY_JSON))],
    "vitctl init B/16 --out ckpt/b16": [("ckpt/b16", lambda box, p: jax_ckpt(p))],  # an earlier checkpoint, for --force
    A: [("ckpt/jax", lambda box, p: jax_ckpt(p)), ("ckpt/torch", converted("ckpt/jax")), ("ckpt/torch-bf16", converted("ckpt/jax", dtype="bfloat16"))],
    "vitctl verify big_vision.npz": [("big_vision.npz", big_vision_npz), ("ckpt/torch", converted("big_vision.npz")), ("photos", photos)],
    "vitctl train --config train.yaml": [("train.yaml", write(TRAIN_YAML))],
    "vitctl train --out runs/digits --resume": [("runs/digits", shell("vitctl train --model vit22b-demo/4 --data digits --out runs/digits --steps 2"))],
    "vitctl train --data data/photos-packed": [("photos", photos), ("data/photos-packed", shell("vitctl data pack photos data/photos-packed --workers 1"))],
    "vitctl train --init-from runs/digits": [("runs/digits", shell("vitctl train --model vit22b-demo/4 --data digits --out runs/digits --steps 2"))],
    "vitctl probe runs/digits": [("runs/digits", lambda box, p: jax_ckpt(p, tiny(channels=1)))],
    "vitctl probe big_vision.npz": [("big_vision.npz", big_vision_npz), ("photos", photos)],
    "vitctl convert jax-to-torch ckpt/ti ": [("ckpt/ti", lambda box, p: jax_ckpt(p))],
    "vitctl convert jax-to-torch ckpt/22b ": [("ckpt/22b", lambda box, p: jax_ckpt(p))],
    "vitctl convert jax-to-torch ViT-B_16.npz": [("ViT-B_16.npz", big_vision_npz)],
    "vitctl convert jax-to-torch ckpt/b16-jax ": [("ckpt/b16-jax", classic_jax)],
    "vitctl convert torch-to-jax hf://google/vit-base-patch16-224": [("_", hf_vit_repo("google/vit-base-patch16-224"))],
    "vitctl convert torch-to-jax ckpt/ti-pt": [("ckpt/ti-pt", torch_ckpt)],
    "vitctl convert torch-to-jax ckpt/22b-pt": [("ckpt/22b-pt", torch_ckpt), ("ckpt/22b-jax", lambda box, p: jax_ckpt(p))],
    "vitctl hub push ckpt/ti-pt": [("ckpt/ti-pt", torch_ckpt)],
    "vitctl hub push runs/demo/": [("runs/demo/jax", lambda box, p: jax_ckpt(p)), ("runs/demo/torch", converted("runs/demo/jax"))],
    "vitctl hub pull me/vit22b-ti": [("_", hub_repo("me/vit22b-ti", branch="exp1"))],
    "HF_HUB_OFFLINE=1 vitctl hub pull": [("_", hub_repo("me/vit22b-ti")), ("_cached", shell("vitctl hub pull me/vit22b-ti --out _cached"))],
    "vitctl probe ckpt/torch": [("_jax", lambda box, p: jax_ckpt(p, tiny(channels=1))), ("ckpt/torch", converted("_jax"))],
    "vitctl data pack photos": [("photos", photos)],
    "vitctl eval runs/digits": [("runs/digits", lambda box, p: jax_ckpt(p, tiny(channels=1)))],
    "vitctl eval ckpt/torch": [("ckpt/torch", torch_ckpt), ("photos", photos)],
    "vitctl eval big_vision.npz": [("big_vision.npz", big_vision_npz), ("photos", photos)],
    "vitctl data info data/digits-packed": [("data/digits-packed", shell("vitctl data pack digits data/digits-packed --workers 1"))],
    "vitctl predict ckpt/torch": [("ckpt/torch", torch_ckpt), ("photos", photos)],
    "vitctl predict runs/digits": [("runs/digits", lambda box, p: jax_ckpt(p, tiny(channels=1))), ("photos", photos)],
    "vitctl predict big_vision.npz": [("big_vision.npz", big_vision_npz), ("photos", photos)],
    "vitctl export ckpt/jax": [("ckpt/jax", lambda box, p: jax_ckpt(p))],
    "vitctl export ckpt/torch": [("ckpt/torch", torch_ckpt)],
    "vitctl export big_vision.npz": [("big_vision.npz", big_vision_npz)],
    "vitctl verify ckpt/jax vit.onnx": [("vit.onnx", shell("vitctl export ckpt/jax vit.onnx"))],
    "vitctl embed runs/digits": [("runs/digits", lambda box, p: jax_ckpt(p, tiny(channels=1)))],
    "vitctl embed ckpt/torch": [("ckpt/torch", torch_ckpt), ("photos", photos)],
    "vitctl embed big_vision.npz": [("big_vision.npz", big_vision_npz), ("photos", photos)],
}  # fmt: skip


def inputs_for(line: str) -> list:
    return [m for start, makers in INPUTS.items() if (line + " ").startswith(start) for m in makers]


def script_for(line: str) -> str:
    if "--process-id 0" in line:  # both processes of a 2-process example, concurrently on this machine
        return f"{line} &\npid=$!\n{line.replace('--process-id 0', '--process-id 1')}\nwait $pid"
    return line


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# ----------------------------------------------------------------------------- tests
ALL = examples()


def test_examples_table_is_current():
    """Every INSTEAD and INPUTS key names an example that exists; every command has 2-3 examples."""
    lines = [line for _, line in ALL]
    assert not set(INSTEAD) - set(lines), set(INSTEAD) - set(lines)
    for start in INPUTS:
        assert any((line + " ").startswith(start) for line in lines), start
    per_command = {}
    for name, _ in ALL:
        per_command[name] = per_command.get(name, 0) + 1
    assert all(n >= 2 for n in per_command.values()), per_command


RUN = [(name, line) for name, line in ALL if not (line in INSTEAD and not INSTEAD[line][0])]  # the rest: INSTEAD says where


@pytest.mark.parametrize("name, line", RUN, ids=[line for _, line in RUN])
def test_example_runs_as_written(name, line, tmp_path):
    box = Sandbox(tmp_path)
    try:
        for rel, make in inputs_for(line):
            path = box.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            make(box, path)
        run = INSTEAD[line][0] if line in INSTEAD else line
        if "http://127.0.0.1:8080" in run:  # the example names a local Hub's address: serve one there
            assert _port_free(8080), "the example's Hub address 127.0.0.1:8080 is taken on this machine"
            local = HubServer(port=8080, token=TOKEN)
            import threading

            t = threading.Thread(target=local.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
        else:
            local = None
        try:
            r = box.sh(script_for(run))
        finally:
            if local is not None:
                local.shutdown()
                local.server_close()
        assert r.returncode == 0, f"`{run}` exited {r.returncode}:\n{r.stderr[-3000:]}"
        assert TOKEN not in r.stdout + r.stderr
        if local is not None:
            assert f"{HF_USER}/vit22b-ti" in local.repos
    finally:
        box.close()


# ----------------------------------------------------------------------------- help text
def help_texts():
    """(where, text as shown) of every command's help and every option's and argument's help.
    Typer renders help as Rich markup, so a `[default: x]` written in a help string is eaten as
    a style tag: the text checked is what the user sees."""
    for name, cmd in walk(click_app()):
        yield f"vitctl {name}", Text.from_markup(cmd.help or "").plain
        for p in cmd.params:
            if getattr(p, "help", None):
                yield f"vitctl {name} {p.opts[0]}", Text.from_markup(p.help).plain


def test_help_texts_have_no_stray_spaces():
    """No help text (as shown) ends in " ." or holds a double space."""
    bad = {where: text for where, text in help_texts() if text.rstrip().endswith(" .") or "  " in text.strip()}
    assert not bad, bad


def test_help_text_check_sees_what_typer_shows():
    """help_texts() reads help the way Typer prints it: in a Typer app built like vitctl's, a
    `[default: x]` written in a help string vanishes from --help and leaves " ." behind."""
    from typer.testing import CliRunner

    demo = typer.Typer()

    @demo.command()
    def push(revision: str = typer.Option("main", help="Branch to commit to [default: main].", show_default=False)) -> None:
        pass

    out = CliRunner().invoke(demo, ["--help"], terminal_width=250).output
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    rendered = Text.from_markup("Branch to commit to [default: main].").plain
    assert rendered == "Branch to commit to ." and rendered in shown and "[default: main]" not in shown
