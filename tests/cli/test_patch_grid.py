"""A config with one patch per image (nothing to attend to): train refuses it (tests/train/test_ux.py),
init and info warn, since a checkpoint may hold one."""

import json


def test_init_and_info_warn_on_one_token(tmp_path, cli):
    rc, stdout, stderr = cli("init", "vit22b-mu/16", "--image-size", "16", "--out", tmp_path / "one")
    assert rc == 0 and "Warning: vit22b-mu/16 cuts 16-px images into 1x1 patch of 16 px" in stderr
    assert "--image-size 32 or more" in stderr
    rc, stdout, _ = cli("info", tmp_path / "one", "--json")
    assert rc == 0 and "1x1 patch" in json.loads(stdout)["warnings"][0]


def test_no_warning_with_a_grid(tmp_path, cli):
    rc, stdout, stderr = cli("info", "vit22b-demo/4", "--json")
    assert rc == 0 and "warnings" not in json.loads(stdout) and "Warning" not in stderr
    rc, _, stderr = cli("init", "vit22b-mu/16", "--image-size", "32", "--out", tmp_path / "four")
    assert rc == 0 and "Warning" not in stderr


def test_probe_notes_a_one_token_checkpoint(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("VITCTL_CACHE", str(tmp_path / "cache"))
    assert cli("init", "vit22b-mu/16", "--image-size", "16", "--num-classes", "10", "--out", tmp_path / "one").returncode == 0
    rc, stdout, stderr = cli("probe", tmp_path / "one", "--data", "digits", "--mode", "fewshot", "--shots", "1", "--seeds", "1", "--json")
    assert rc == 0, stderr
    assert any("1x1 patch of 16 px" in n for n in json.loads(stdout)["notes"]) and "note: " in stderr
