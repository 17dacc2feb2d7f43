"""`vitctl demo`, the README's main job: init -> convert -> verify, and --force reruns."""

import json

import pytest

pytest.importorskip("jax")
pytest.importorskip("torch")

from vitctl.cli import main  # noqa: E402


def run(*args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def test_demo_runs_the_path_and_reruns_with_force(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run("demo", "--out", out) == 0
    assert "PASSED" in capsys.readouterr().out
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["max_abs"] < 1e-5
    assert (out / "jax" / "params").is_dir() and (out / "torch" / "model.safetensors").is_file()
    assert run("demo", "--out", out) == 2  # exists: nothing overwritten without --force
    assert run("demo", "--out", out, "--force") == 0
