"""Adversarial cases for the core: outputs (--force, temporaries, signals, full disks), init's
resource checks, configs from strangers, verify's bars and info's inputs.

Each case runs the real `vitctl` in a subprocess in a sandbox (tests/adversarial/conftest.py)
and checks what the user relies on: the exit code, one `Error:` line and no traceback,
nothing changed outside the output, no leftover temporary.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.adversarial.conftest import assert_refused, leftovers, run_vitctl, snapshot, start_vitctl, wait_for
from vitctl import checkpoint as ckpt
from vitctl.config import ViTConfig
from vitctl.formats import layout

MODEL = "vit22b-mu/16"  # the paper's block at its smallest: a JAX init in seconds
SLOW = {"VITCTL_TEST_SLEEP_PER_TENSOR": "1"}  # init pauses after each tensor it writes: a signal lands mid-write


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A vitctl JAX checkpoint (by `vitctl init`), made once; tests copy it."""
    root = tmp_path_factory.mktemp("made")
    r = run_vitctl("init", MODEL, "--out", root / "ckpt", cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "ckpt"


def user_folder(path: Path, config: dict | None) -> Path:
    """A user's project folder: a thesis, sources and (maybe) a config.json."""
    path.mkdir()
    (path / "thesis.tex").write_text("\\documentclass{article} years of work")
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("print('hello')\n")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def vitctl_config() -> dict:
    return {"vitctl_version": "0", "model": ViTConfig.from_variant(MODEL).to_dict(), "provenance": {}}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def fake_temporary(parent: Path, dst_name: str, pid: int, extra: str | None = None) -> Path:
    """What a killed init leaves: `.DST.tmp-XXXXXXXX` with a half-written params/ and its owner record."""
    tmp = parent / f".{dst_name}.tmp-{random.Random(pid).getrandbits(32):08x}"
    (tmp / "params").mkdir(parents=True)
    (tmp / "params" / "manifest.ocdbt").write_bytes(b"\0" * 64)
    (tmp / ckpt.OWNER).write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "start": None}))
    if extra:
        (tmp / extra).write_text("not vitctl's")
    return tmp


# --force never deletes a user's files.
@pytest.mark.parametrize("command", ["init", "convert"])
@pytest.mark.parametrize("folder", ["vitctl-config", "foreign-config", "no-config", "hidden-git", "symlink-inside"])
def test_force_refuses_a_folder_vitctl_did_not_write(sandbox, made, command, folder):
    dst = user_folder(sandbox.root / "project", vitctl_config() if folder != "foreign-config" else {"name": "webapp", "port": 8080})
    if folder == "no-config":
        (dst / "config.json").unlink()
    if folder == "hidden-git":  # a real checkpoint, plus the user's own .git
        shutil.rmtree(dst)
        shutil.copytree(made, dst)
        (dst / ".git").mkdir()
        (dst / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    if folder == "symlink-inside":
        shutil.rmtree(dst)
        shutil.copytree(made, dst)
        (dst / "model.safetensors").symlink_to(sandbox.root / "project-notes.txt")
        (sandbox.root / "project-notes.txt").write_text("notes")
    sandbox.before()
    args = ["init", MODEL, "--out", dst] if command == "init" else ["convert", "jax-to-torch", made, dst]
    r = run_vitctl(*args, "--force", cwd=sandbox.root)
    assert_refused(r, sandbox, code=2, says="not a vitctl checkpoint")
    assert "remove" in r.stderr and "yourself" in r.stderr
    named = {
        "vitctl-config": "src",
        "foreign-config": "src",
        "no-config": "src",
        "hidden-git": ".git",
        "symlink-inside": "model.safetensors",
    }
    assert named[folder] in r.stderr.splitlines()[0]


@pytest.mark.parametrize("command", ["init", "convert"])
def test_force_refuses_a_symlinked_output(sandbox, made, command):
    target = sandbox.root / "real"
    shutil.copytree(made, target)
    (sandbox.root / "link").symlink_to(target)
    sandbox.before()
    args = ["init", MODEL, "--out", "link"] if command == "init" else ["convert", "jax-to-torch", made, "link"]
    r = run_vitctl(*args, "--force", cwd=sandbox.root)
    assert_refused(r, sandbox, code=2, says="symlink")


def test_force_replaces_what_vitctl_wrote(sandbox, made):
    # The control: a vitctl checkpoint with every entry train and hub pull add is replaced.
    dst = sandbox.root / "ckpt"
    shutil.copytree(made, dst)
    for name in ("train_config.json", "metrics.jsonl", "metrics.png", "README.md", "verify.json"):
        (dst / name).write_text("{}")
    (dst / "state").mkdir()
    r = run_vitctl("init", MODEL, "--out", dst, "--force", "--seed", "1", cwd=sandbox.root)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params"] and leftovers(sandbox.root) == []


# Stale temporaries.
def test_a_killed_init_is_reclaimed_by_the_next_run(sandbox):
    p = start_vitctl("init", MODEL, "--out", "out", cwd=sandbox.root, env=SLOW)
    wait_for(lambda: any((t / "params").is_dir() for t in sandbox.root.glob(".out.tmp-*")), p, "the weights being written")
    p.kill()  # SIGKILL: no cleanup can run
    p.communicate()
    assert len(leftovers(sandbox.root)) == 1
    r = run_vitctl("init", MODEL, "--out", "out", cwd=sandbox.root)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "removed" in line]
    assert len(notes) == 1 and ".out.tmp-" in notes[0] and f"process {p.pid}" in notes[0]
    assert leftovers(sandbox.root) == [] and layout.detect_formats(sandbox.root / "out") == [layout.JAX]


def test_stale_temporaries_are_removed_and_live_or_foreign_ones_kept(sandbox):
    stale = fake_temporary(sandbox.root, "out", dead_pid())
    live = fake_temporary(sandbox.root, "out", os.getpid())  # this test's own process: alive
    foreign = fake_temporary(sandbox.root, "out", dead_pid(), extra="thesis.tex")  # holds a file vitctl never writes
    other = fake_temporary(sandbox.root, "other", dead_pid())  # another output's: not this run's business
    kept = {p: snapshot(p) for p in (live, foreign, other)}
    r = run_vitctl("init", MODEL, "--out", "out", cwd=sandbox.root)
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert all(p.exists() and snapshot(p) == s for p, s in kept.items())
    assert sum("removed" in line for line in r.stderr.splitlines()) == 1


def test_a_stale_replaced_output_is_removed(sandbox, made):
    old = sandbox.root / ".out.old-0badcafe"  # killed between renaming DST away and removing it
    shutil.copytree(made, old)
    (old / ckpt.OWNER).write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename, "start": None}))
    r = run_vitctl("init", MODEL, "--out", "out", cwd=sandbox.root)
    assert r.returncode == 0, r.stderr
    assert not old.exists() and leftovers(sandbox.root) == []


# Signals during init.
@pytest.mark.parametrize("stage", ["temporary", "params", "first-tensor"])
def test_sigterm_during_init_leaves_nothing(sandbox, stage):
    sandbox.before()
    p = start_vitctl("init", MODEL, "--out", "out", cwd=sandbox.root, env=SLOW)

    def reached():
        tmps = list(sandbox.root.glob(".out.tmp-*"))
        if stage == "temporary":
            return bool(tmps)
        params = [t / "params" for t in tmps if (t / "params").is_dir()]
        if stage == "params":
            return bool(params)
        return any((d / "d").is_dir() and any((d / "d").iterdir()) for d in params)  # OCDBT data files: a tensor is stored

    wait_for(reached, p, f"init to reach {stage}")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 130, err[-3000:]
    assert "Interrupted" in err and "Traceback" not in err and out == ""
    assert sandbox.changed() == [] and leftovers(sandbox.root) == []


# init: memory and disk.
def test_init_vit22b_is_refused_with_the_numbers(sandbox):
    sandbox.before()
    r = run_vitctl("init", "vit-22b", "--out", "big", cwd=sandbox.root)
    assert_refused(r, sandbox, code=1, says="GiB available")
    assert "vitctl plan" in r.stderr and "smaller preset" in r.stderr


def test_init_vit22b_under_an_address_space_limit(sandbox):
    sandbox.before()
    r = run_vitctl("init", "vit-22b", "--out", "big", cwd=sandbox.root, memory=3 * 2**30)
    assert_refused(r, sandbox, code=1, says="needs")
    assert "GiB" in r.stderr.splitlines()[0]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_init_past_the_file_size_limit(sandbox, backend):
    sandbox.before()
    r = run_vitctl("init", MODEL, "--out", "out", "--backend", backend, cwd=sandbox.root, file_size=64 * 1024)
    assert_refused(r, sandbox, code=1, says="no space to write out")
    assert "ulimit -f" in r.stderr


@pytest.mark.parametrize("parent", ["read-only", "a-file"])
def test_init_into_an_unwritable_parent(sandbox, parent):
    says = "cannot create"
    if parent == "a-file":
        (sandbox.root / "notes.txt").write_text("a file, not a folder")
        out = sandbox.root / "notes.txt" / "out"
    elif os.geteuid() == 0:  # root writes through permissions; /sys refuses even root (and reports no free space)
        out, says = Path("/sys/vitctl-adversarial/out"), "/sys"
    else:
        (sandbox.root / "ro").mkdir()
        (sandbox.root / "ro").chmod(0o555)
        out = sandbox.root / "ro" / "out"
    sandbox.before()
    try:
        r = run_vitctl("init", MODEL, "--out", out, cwd=sandbox.root)
    finally:
        if (sandbox.root / "ro").exists():
            (sandbox.root / "ro").chmod(0o755)
    assert_refused(r, sandbox, code=1, says=says)
    assert not out.exists()


# Configs from strangers.
def nested(depth: int) -> str:
    return '{"model": ' * depth + "{}" + "}" * depth


HOSTILE_CONFIGS = {
    "million-layers": (json.dumps({**vitctl_config(), "model": {**ViTConfig().to_dict(), "depth": 10**6}}), "depth must be in the range"),
    "huge-int": (json.dumps({"model": {**ViTConfig().to_dict(), "width": 10**4000}}), "width must be in the range"),
    "wide-mlp": (json.dumps({"model": {**ViTConfig().to_dict(), "mlp_dim": 2**40}}), "mlp_dim must be in the range"),
    "deep": (nested(100_000), "nests json"),
    "garbage": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "not json"),
    "list": ("[1, 2, 3]", "must hold a json object"),
    "wrong-type": (json.dumps({"model": {**ViTConfig().to_dict(), "preprocess": "imagenet"}}), "preprocess must be an object"),
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
@pytest.mark.parametrize("how", ["info-dir", "info-file", "init-config"])
def test_hostile_config(sandbox, case, how):
    text, says = HOSTILE_CONFIGS[case]
    d = sandbox.root / "ckpt"
    d.mkdir()
    f = d / "config.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    sandbox.before()
    args = {"info-dir": ["info", d], "info-file": ["info", f], "init-config": ["init", "--config", f, "--out", "out"]}[how]
    r = run_vitctl(*args, cwd=sandbox.root, memory=2 * 2**30)
    assert_refused(r, sandbox, code=2, says=says)
    assert "config.json" in r.stderr.splitlines()[0]  # the file is named


def test_oversized_config_is_not_read(sandbox):
    f = sandbox.root / "config.json"
    with open(f, "wb") as fh:  # sparse: 1 GiB that takes no disk
        fh.truncate(2**30)
    sandbox.before()
    r = run_vitctl("info", f, cwd=sandbox.root, memory=2 * 2**30)
    assert_refused(r, sandbox, code=2, says="more than any JSON file")


# verify's bars.
@pytest.mark.parametrize("flag", [["--tolerance", "-1"], ["--tolerance", "nan"], ["--rtol", "-1e-3"], ["--rtol", "inf"]])
def test_verify_rejects_a_meaningless_bar(sandbox, made, flag):
    sandbox.before()
    r = run_vitctl("verify", made, made, *flag, cwd=sandbox.root)
    assert_refused(r, sandbox, code=2, says=f"{flag[0]} must be a finite number")


# info on a big_vision .npz, as convert reads it.
def test_info_on_a_big_vision_npz(sandbox):
    from vitctl.convert import big_vision
    from vitctl.params import jax_param_shapes

    cfg = dataclasses.replace(ViTConfig.from_variant("mu/16"), image_size=32, num_classes=5)
    shapes = jax_param_shapes(cfg, stacked=False)
    np.savez(sandbox.root / "bv.npz", **{big_vision.to_big_vision(n): np.zeros(s, np.float32) for n, s in shapes.items()})
    r = run_vitctl("info", "bv.npz", "--json", cwd=sandbox.root)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["formats"] == ["big_vision"] and ViTConfig.from_dict(info["config"]) == cfg


@pytest.mark.parametrize("damage", ["bad-member", "not-a-zip"])
def test_info_on_a_damaged_npz(sandbox, damage):
    import zipfile

    if damage == "bad-member":
        with zipfile.ZipFile(sandbox.root / "bad.npz", "w") as z:
            z.writestr("embedding/kernel.npy", b"\x93NUMPY garbage header")
    else:
        (sandbox.root / "bad.npz").write_bytes(b"PK\x03\x04 cut short")
    sandbox.before()
    r = run_vitctl("info", "bad.npz", cwd=sandbox.root)
    assert_refused(r, sandbox, code=1, says="bad.npz")
