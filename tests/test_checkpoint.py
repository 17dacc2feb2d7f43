"""The checkpoint directory: round trips, bf16, bounded Orbax chunks, atomic writes."""

import json
import os
import socket
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from tests.conftest import tiny
from vitctl import checkpoint as ckpt
from vitctl.convert.mapping import jax_param_shapes, jax_to_torch
from vitctl.errors import CheckpointError, OutputExistsError
from vitctl.formats import layout

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def random_params(cfg, seed=0):
    """JAX-layout parameters with distinct random values (no model init: fast)."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(DTYPES[cfg.param_dtype]) for n, s in jax_param_shapes(cfg).items()}


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for n in want:
        assert got[n].dtype == want[n].dtype, n
        assert got[n].shape == want[n].shape, n
        np.testing.assert_array_equal(got[n].view(np.uint8), np.ascontiguousarray(want[n]).view(np.uint8), err_msg=n)


def test_config_json(tmp_path):
    cfg = tiny(param_dtype="bfloat16")
    ckpt.write_config(tmp_path, cfg, {"source_format": "init", "source": "tiny", "created_by": "test"})
    d = json.loads((tmp_path / layout.CONFIG).read_text())
    assert set(d) == {"vitctl_version", "model", "provenance"}
    assert layout.read_checkpoint_config(tmp_path) == cfg
    assert layout.read_checkpoint_config(tmp_path / layout.CONFIG) == cfg
    assert layout.read_provenance(tmp_path)["source"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == [layout.CONFIG]  # no temporary left behind


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_output_writes_on_success(tmp_path):
    dst = tmp_path / "out" / "ckpt"  # parents are created
    with ckpt.atomic_output(dst) as tmp:
        assert tmp.parent == dst.parent and tmp.name.startswith(".ckpt.tmp-") and not dst.exists()
        ckpt.write_config(tmp, tiny(), {})
    assert siblings(dst) == ["ckpt"]
    assert (dst / layout.CONFIG).is_file()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_leaves_nothing_on_failure(tmp_path, exc):
    dst = tmp_path / "ckpt"
    with pytest.raises(exc), ckpt.atomic_output(dst) as tmp:
        ckpt.write_config(tmp, tiny(), {})
        layout.save_torch(tmp, jax_to_torch(random_params(tiny()), tiny()))
        raise exc("interrupted mid-write")
    assert siblings(dst) == []


def test_atomic_output_refuses_existing_without_force(tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    with pytest.raises(OutputExistsError, match="already exists") as e, ckpt.atomic_output(dst):
        pytest.fail("must not get here")
    assert "--force" in e.value.hint and e.value.exit_code == 2
    assert siblings(dst) == ["ckpt"]


def test_atomic_output_force_replaces_only_when_complete(tmp_path):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    ckpt.write_config(dst, tiny(), {"source": "old"})
    with pytest.raises(RuntimeError), ckpt.atomic_output(dst, force=True) as tmp:
        ckpt.write_config(tmp, tiny(depth=3), {"source": "new"})
        raise RuntimeError("fails before completion")
    assert layout.read_provenance(dst)["source"] == "old" and siblings(dst) == ["ckpt"]
    with ckpt.atomic_output(dst, force=True) as tmp:
        ckpt.write_config(tmp, tiny(depth=3), {"source": "new"})
    assert layout.read_provenance(dst)["source"] == "new" and siblings(dst) == ["ckpt"]


def test_force_never_replaces_a_foreign_directory(tmp_path):
    dst = tmp_path / "home"
    dst.mkdir()
    (dst / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a vitctl checkpoint"), ckpt.atomic_output(dst, force=True):
        pass
    assert (dst / "thesis.tex").read_text() == "precious" and siblings(dst) == ["home"]


def test_importable_without_jax_or_torch():
    code = "import sys, vitctl.checkpoint; print(sorted(m for m in ('jax', 'torch', 'orbax', 'flax') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def vitctl_dir(path, *extra):
    path.mkdir()
    ckpt.write_config(path, tiny(), {})
    for name in extra:
        (path / name).mkdir() if name in ("params", "state", ".git", "src") else (path / name).write_text("{}")
    return path


@pytest.mark.parametrize(
    "extra, why",
    [
        ((), None),
        (("params", "state", "model.safetensors", "model-00001-of-00002.safetensors", "README.md", ".config.json.tmp-1a2b3c4d"), None),
        (("thesis.tex",), "it holds thesis.tex, which vitctl does not write"),
        ((".git",), "it holds .git"),
        (("src",), "it holds src"),
        (("demo.json",), "it holds demo.json"),  # a run's file, not a checkpoint's
    ],
)
def test_foreign_names_what_vitctl_did_not_write(tmp_path, extra, why):
    got = ckpt.foreign(vitctl_dir(tmp_path / "d", *extra))
    assert got == why if why is None else why in got


def test_foreign_needs_vitctls_own_config(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "config.json").write_text('{"name": "webapp"}')
    assert "config.json has no vitctl model config" in ckpt.foreign(tmp_path / "web")
    (tmp_path / "web" / "config.json").write_text("[" * 10_000)
    assert "config.json is not a vitctl checkpoint config" in ckpt.foreign(tmp_path / "web")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.safetensors").write_text("")
    assert ckpt.foreign(tmp_path / "bare") == "it has no config.json"
    assert ckpt.foreign(tmp_path / "bare", complete=False) is None  # a half-written temporary needs no config yet
    (tmp_path / "empty").mkdir()
    assert ckpt.foreign(tmp_path / "empty") is None


def test_a_run_directory_is_checked_down_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt.write_json(run / ckpt.RUN_MARKER, {"created_by": "vitctl demo"})
    vitctl_dir(run / "jax", "params", "metrics.jsonl")
    (run / "demo.json").write_text("{}")
    assert ckpt.foreign(run) is None
    (run / "jax" / "notes.md").write_text("mine")
    assert ckpt.foreign(run) == "jax/: it holds notes.md, which vitctl does not write"


def test_force_refuses_symlinks_and_files(tmp_path):
    target = vitctl_dir(tmp_path / "real")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("x")
    for dst in (tmp_path / "link", tmp_path / "file"):
        with pytest.raises(OutputExistsError, match="not a vitctl checkpoint directory") as e:
            ckpt.check_output(dst, force=True)
        assert "yourself" in e.value.hint
    assert (target / layout.CONFIG).is_file()


def test_stale_temporaries_are_reclaimed_by_owner(tmp_path, capsys):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()

    def temporary(name, pid, *entries):
        t = tmp_path / name
        t.mkdir()
        for e in entries:
            (t / e).mkdir()
        if pid is not None:
            (t / ckpt.OWNER).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": None}))
        return t

    stale = temporary(".out.tmp-00000001", done.pid, "params")
    old = temporary(".out.old-00000002", done.pid, "params")
    live = temporary(".out.tmp-00000003", os.getpid(), "params")
    foreign = temporary(".out.tmp-00000004", done.pid, "src")
    unowned = temporary(".out.tmp-00000005", None, "params")
    other = temporary(".other.tmp-00000006", done.pid, "params")
    assert sorted(ckpt.reclaim_temporaries(tmp_path / "out")) == sorted([stale, old])
    assert [p.exists() for p in (stale, old, live, foreign, unowned, other)] == [False, False, True, True, True, True]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and sum("removed" in line for line in err) == 2 and any("left" in line and unowned.name in line for line in err)


def test_atomic_output_leaves_no_owner_record(tmp_path):
    with ckpt.atomic_output(tmp_path / "o") as tmp:
        assert (tmp / ckpt.OWNER).is_file()
        ckpt.write_config(tmp, tiny(), {})
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [layout.CONFIG]


def test_no_space_reads_the_errno_wherever_it_is():
    import errno

    assert ckpt.no_space(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == os.strerror(errno.ENOSPC)
    assert ckpt.no_space(ValueError("Failed to write 16 bytes to file 17: ... [os_error_code='27']")) == os.strerror(errno.EFBIG)
    assert ckpt.no_space(CheckpointError(f"cannot write x: {os.strerror(errno.EDQUOT)}")) == os.strerror(errno.EDQUOT)
    assert ckpt.no_space(OSError(errno.EACCES, "Permission denied")) is None


@pytest.mark.parametrize(
    ("value", "key", "public"),
    [
        ("/home/me/runs/.demo.tmp-1a2b3c4d/jax", "source", "jax"),  # demo converts inside atomic_output's temporary
        ("/home/me/ckpt/.ti.tmp-1a2b3c4d", "source", "ti"),  # the temporary itself: the name it becomes
        ("/data/x/.config.json.tmp-abcd", "path", "config.json"),
        ("~/photos/", "data", "photos"),
        ("/root/.cache/huggingface/hub/models--me--tiny/snapshots/" + "a" * 40, "source", f"hf://me/tiny@{'a' * 40}"),
        ("hf://me/tiny@v1", "source", "hf://me/tiny@v1"),
        ("http://127.0.0.1:8080", "endpoint", "http://127.0.0.1:8080"),
        ("digits", "data", "digits"),  # a named data set
        ("B/16", "source", "B/16"),  # a preset with a slash
        ("me/tiny", "repo_id", "me/tiny"),
        ("vitctl convert jax-to-torch", "created_by", "vitctl convert jax-to-torch"),
    ],
)
def test_public_value(value, key, public):
    assert ckpt.public_value(value, key in ckpt.PATH_KEYS) == public


def test_write_config_stores_provenance_in_public_form(tmp_path, monkeypatch):
    """Every writer goes through write_config: nested source_provenance scrubbed, a relative path
    that exists here reduced to its name, other fields and types kept, `head` keys first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/a").mkdir(parents=True)
    prov = {
        "source": "runs/a", "created_by": "vitctl convert jax-to-torch", "step": 40, "test_accuracy": 0.5, "class_names": ["a/b", "c"],
        "source_provenance": {"source": str(tmp_path / ".run.tmp-00ff00ff/model.json"), "data": str(tmp_path / "imgs"), "seed": 0},
    }  # fmt: skip
    ckpt.write_config(tmp_path, tiny(), prov, head={"architecture": "vit_base_patch16_224"})
    d = json.loads((tmp_path / "config.json").read_text())
    assert next(iter(d)) == "architecture"
    assert d["provenance"] == {**prov, "source": "a", "source_provenance": {"source": "model.json", "data": "imgs", "seed": 0}}
    assert str(tmp_path) not in json.dumps(d) and ".tmp-" not in json.dumps(d)


def test_atomic_file_refuses_an_existing_file_leaves_nothing_on_error_and_reclaims_a_killed_runs_temporary(tmp_path):
    import subprocess
    import sys

    from vitctl.checkpoint import atomic_file
    from vitctl.errors import OutputExistsError

    d = tmp_path / "x.bin"
    with atomic_file(d) as t:
        t.write_bytes(b"ab")
    assert d.read_bytes() == b"ab"
    with pytest.raises(OutputExistsError), atomic_file(d) as t:
        pass
    e = tmp_path / "y.bin"
    with pytest.raises(RuntimeError), atomic_file(e) as t:
        t.write_bytes(b"x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == [d]
    code = f"from vitctl.checkpoint import atomic_file\nimport os\nwith atomic_file({str(e)!r}) as t:\n    t.write_bytes(b'1'); os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    assert len(list(tmp_path.iterdir())) == 2
    with atomic_file(e) as t:
        t.write_bytes(b"z")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "y.bin"]
