"""`vitctl hub push/pull` and hf:// checkpoints against the loopback Hub, with the real huggingface_hub client."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.hub.conftest import CFG, TOKEN, repo_files, same_weights, torch_ckpt
from vitctl.cli import main
from vitctl.errors import ConfigError
from vitctl.hub import parse_repo

REPO = "me/tiny"


def no_token(*runs):
    for r in runs:
        assert TOKEN not in r.stdout and TOKEN not in r.stderr


def in_process(*args, capsys):
    """`vitctl ARGS` in this process, for commands that never reach the Hub client; (exit code, stdout + stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out + err


def test_push_pull_verify_bitwise(hub, vitctl, tmp_path, capsys):
    src = torch_ckpt(tmp_path / "src")
    push = vitctl("hub", "push", src, REPO, "--private", "--json")
    assert push.returncode == 0, push.stderr
    p = json.loads(push.stdout)
    assert p["verified"] and p["commit"] == hub.repos[REPO].branches["main"] and hub.repos[REPO].private
    assert {f["path"] for f in p["files"]} == set(repo_files(src)) | {"README.md"}
    assert all(hub.content(REPO, "main", f) == b for f, b in repo_files(src).items())  # what the server stores

    pull = vitctl("hub", "pull", REPO, "--out", tmp_path / "pulled", "--json")
    assert pull.returncode == 0, pull.stderr
    got = json.loads(pull.stdout)
    assert got["commit"] == p["commit"] and got["formats"] == ["vitctl-torch"]
    prov = json.loads((tmp_path / "pulled/config.json").read_text())["provenance"]
    assert prov["revision"] == p["commit"] and prov["source"] == f"hf://{REPO}@{p['commit']}"
    assert prov["upstream"]["seed"] == 0

    code, v = in_process("verify", src, tmp_path / "pulled", "--json", "--batch", "1", capsys=capsys)  # local dirs: no Hub client
    assert code == 0, v
    w = json.loads(v)["weights"]
    assert w["exactly_equal"] == w["compared"] > 0 and w["max_abs"] == 0
    no_token(push, pull)
    assert f"Bearer {TOKEN}" in hub.auth_seen  # the token was sent, never shown


def test_model_card_is_valid_yaml_and_markdown(hub, vitctl, tmp_path):
    """A real checkpoint with a verify report: the card's front matter parses and holds the required keys."""
    from vitctl.params import param_counts

    src = torch_ckpt(tmp_path / "run/torch")
    report = {"a": {"path": str(tmp_path / ".run.tmp-1a2b/jax")}, "b": {"path": str(tmp_path / ".run.tmp-1a2b/torch")}, "passed": True, "max_abs": 0.0,
              "tolerance": 1e-5, "rtol": 1e-5, "first_divergent": None, "settings": {"precision": "fp32", "vitctl": "0.1.0"},
              "weights": {"compared": 9, "exactly_equal": 9}}  # fmt: skip
    (tmp_path / "run/verify.json").write_text(json.dumps(report))  # where `vitctl demo` puts it: the parent (verified before its rename)
    r = vitctl("hub", "push", src, REPO, "--license", "apache-2.0")
    assert r.returncode == 0, r.stderr
    card = hub.content(REPO, "main", "README.md").decode()
    m = re.fullmatch(r"---\n(.*?)\n---\n(.*)", card, re.DOTALL)
    assert m, card[:200]
    meta, body = yaml.safe_load(m.group(1)), m.group(2)
    assert meta["library_name"] == "vitctl" and meta["pipeline_tag"] == "image-classification" and meta["license"] == "apache-2.0"
    assert "vitctl" in meta["tags"] and "jax" not in meta["tags"]
    v = meta["vitctl"]
    assert v["parameters"] == param_counts(CFG)["params_total"]
    assert v["architecture"] == json.loads(json.dumps({k: x for k, x in CFG.to_dict().items() if k != "preprocess"}))
    assert v["preprocessing"] == json.loads(json.dumps(CFG.to_dict()["preprocess"]))
    assert v["verify"]["passed"] is True and v["verify"]["weights_exactly_equal"] == 9
    uploaded = json.loads(hub.content(REPO, "main", "verify.json"))  # the report, its sides' paths reduced to names
    assert uploaded == {**report, "a": {"path": "jax"}, "b": {"path": "torch"}}
    assert body.lstrip().startswith("# tiny\n") and "| option | value |" in body and "`vitctl verify` passed" in body


def test_revision_pinning_branches_and_stale_shards(hub, vitctl, tmp_path):
    a, b = torch_ckpt(tmp_path / "a", seed=0), torch_ckpt(tmp_path / "b", seed=1, max_shard_bytes=None)
    first = json.loads(vitctl("hub", "push", a, REPO, "--json").stdout)["commit"]
    r = vitctl("hub", "push", b, REPO, "--json", "-m", "one file")
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["commit"] != first and len(second["deleted"]) == len([f for f in repo_files(a) if f.startswith("model")])
    branch = vitctl("hub", "push", a, REPO, "--revision", "exp", "--json")
    assert branch.returncode == 0, branch.stderr

    for spec, want, out in ((f"{REPO}@{first}", a, "p1"), (REPO, b, "p2"), (f"{REPO}@exp", a, "p3")):
        r = vitctl("hub", "pull", spec, "--out", tmp_path / out, "--backend", "torch")
        assert r.returncode == 0, r.stderr
        assert same_weights(tmp_path / out, want)
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == ["config.json", "model.safetensors"]  # old shards gone
    assert json.loads((tmp_path / "p1/config.json").read_text())["provenance"]["revision"] == first


def test_offline_pulls_from_the_cache(hub, vitctl, tmp_path):
    sha = hub.seed(REPO, repo_files(torch_ckpt(tmp_path / "src")))
    assert vitctl("hub", "pull", REPO, "--out", tmp_path / "online").returncode == 0
    hub.shutdown()  # the Hub is gone: only the cache can answer
    for args, env in (((REPO,), {"HF_HUB_OFFLINE": "1"}), ((f"{REPO}@{sha}", "--offline"), None)):
        out = tmp_path / f"off{len(args)}"
        r = vitctl("hub", "pull", *args, "--out", out, env=env)
        assert r.returncode == 0, r.stderr
        assert same_weights(out, tmp_path / "src")
        assert json.loads((out / "config.json").read_text())["provenance"]["revision"] == sha
    r = vitctl("hub", "pull", "me/other", "--out", tmp_path / "never", "--offline")
    assert r.returncode == 1 and "not (completely) in the local Hugging Face cache" in r.stderr and "Hint:" in r.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    ("fault", "where", "times", "ok", "message"),
    [
        (500, "model-00002", 1, True, None),  # a transient 500 on one shard: retried
        ("truncate", "model-00002", 1, True, None),  # cut short: the client resumes with Range
        ("corrupt", "model-00002", 1, True, None),  # wrong bytes: the sha256 check re-fetches that file only
        (500, f"/api/models/{REPO}", 9, False, "failed with HTTP 500"),  # a Hub that keeps failing: 3 tries, then a clear error
        ("corrupt", "model-00002", 9, False, "do not match the repo's own listing"),
        (404, "model-00002", 1, False, "missing on"),
        (401, f"/api/models/{REPO}", 1, False, "refused access"),
    ],
)
def test_faults(hub, vitctl, tmp_path, fault, where, times, ok, message):
    hub.seed(REPO, repo_files(torch_ckpt(tmp_path / "src")))
    hub.fail(where, fault, times)
    out = tmp_path / "out"
    r = vitctl("hub", "pull", REPO, "--out", out, "--json")
    hits = [s for m, p, s in hub.log if where in p]
    if ok:
        assert r.returncode == 0, r.stderr
        assert same_weights(out, tmp_path / "src")
        assert json.loads(r.stdout)["refetched"] == (["model-00002-of-00009.safetensors"] if fault == "corrupt" else [])
        if fault == "truncate":
            assert hits.index(-200) < len(hits) - 1 and hits[-1] in (200, 206)  # the cut response, then a good one
    else:
        assert r.returncode == 1 and "Error: " in r.stderr and message in r.stderr and "Hint:" in r.stderr, r.stderr
        assert r.stdout == "" and not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing partial
        if fault == 500 and times == 9:
            assert hits.count(500) == 3
        if fault in (404, 401):
            assert hits.count(fault) == 1  # not retried
    no_token(r)


def test_push_errors_and_retries(hub, vitctl, tmp_path, capsys):
    src = torch_ckpt(tmp_path / "src")
    hub.fail("/commit/", 500, 1)
    r = vitctl("hub", "push", src, REPO)
    assert r.returncode == 0, r.stderr
    assert [s for m, p, s in hub.log if "/commit/" in p] == [500, 200]
    bad = vitctl("hub", "push", src, REPO, env={"HF_TOKEN": TOKEN[::-1]})
    assert bad.returncode == 1 and "refused access" in bad.stderr and "HF_TOKEN" in bad.stderr
    hub.misreport.add("model-00001-of-00009.safetensors")
    bad_remote = vitctl("hub", "push", src, REPO, "-m", "again")
    assert bad_remote.returncode == 1 and "model-00001-of-00009.safetensors does not match the local file" in bad_remote.stderr
    nothing = vitctl("hub", "pull", REPO, "--out", tmp_path / "x", "--endpoint", "http://127.0.0.1:9")  # discard port: nothing listens
    assert nothing.returncode == 1 and "cannot reach the Hub at http://127.0.0.1:9" in nothing.stderr and not (tmp_path / "x").exists()
    no_token(r, bad, bad_remote, nothing)


def test_damaged_cache_refetches_only_the_bad_shard(hub, vitctl, tmp_path):
    hub.seed(REPO, repo_files(torch_ckpt(tmp_path / "src")))
    assert vitctl("hub", "pull", REPO, "--out", tmp_path / "one").returncode == 0
    blob = (next(vitctl.home.glob("hub/models--me--tiny/snapshots/*")) / "model-00003-of-00009.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:100])  # truncated in the cache
    before = len(hub.log)
    r = vitctl("hub", "pull", REPO, "--out", tmp_path / "two", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["refetched"] == ["model-00003-of-00009.safetensors"]
    gets = [p for m, p, s in hub.log[before:] if m == "GET" and "/resolve/" in p]
    assert len(gets) == 1 and gets[0].endswith("model-00003-of-00009.safetensors")
    assert same_weights(tmp_path / "two", tmp_path / "src")


def test_hf_uris_in_info_and_convert(hub, vitctl, tmp_path):
    sha = hub.seed(REPO, repo_files(torch_ckpt(tmp_path / "src")))
    info = vitctl("info", f"hf://{REPO}@{sha}", "--json")
    assert info.returncode == 0, info.stderr
    d = json.loads(info.stdout)
    assert d["name"] == f"hf://{REPO}@{sha}" and d["config"] == json.loads(json.dumps(CFG.to_dict())) and d["provenance"]["seed"] == 0
    conv = vitctl("convert", "torch-to-jax", f"hf://{REPO}", tmp_path / "jax", "--json")
    assert conv.returncode == 0, conv.stderr
    assert (tmp_path / "jax/params").is_dir()


def test_include_jax_and_backend_jax_downloads_only_params(hub, vitctl, tmp_path, capsys):
    from tests.conftest import random_params
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout

    src = torch_ckpt(tmp_path / "both")
    params = random_params(CFG, 0)
    layout.save_jax(src, params)
    jax_only = tmp_path / "jax-only"
    jax_only.mkdir()
    layout.save_jax(jax_only, params)
    ckpt.write_config(jax_only, CFG, {"source_format": "test"})
    code, refused = in_process("hub", "push", jax_only, REPO, "--endpoint", hub.url, capsys=capsys)  # refused before any upload
    assert code == 2 and "--include-jax" in refused and REPO not in hub.repos
    r = vitctl("hub", "push", src, REPO, "--include-jax", "--json")
    assert r.returncode == 0, r.stderr
    assert any(f["path"].startswith("params/") for f in json.loads(r.stdout)["files"])
    before = len(hub.log)
    pull = vitctl("hub", "pull", REPO, "--out", tmp_path / "jax", "--backend", "jax")
    assert pull.returncode == 0, pull.stderr
    fetched = {p.split("/resolve/")[1].split("/", 1)[1] for m, p, s in hub.log[before:] if m == "GET" and "/resolve/" in p}
    assert fetched == {"config.json"} | {f for f in repo_files(src) if f.startswith("params/")}  # no safetensors
    got = layout.load_jax(tmp_path / "jax", CFG)
    assert layout.detect_formats(tmp_path / "jax") == ["vitctl-jax"]
    assert all((got[k] == params[k]).all() for k in params)


def test_local_paths_do_not_import_huggingface_hub(tmp_path):
    code = "import sys, vitctl.hub as h; assert h.resolve_checkpoint('a/b') == __import__('pathlib').Path('a/b'); print('huggingface_hub' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.parametrize("spec", ["org", "org/name@", "../x", "a/b/c", "hf://", "not a repo"])
def test_bad_repo_ids(spec, capsys):
    with pytest.raises(ConfigError, match="is not a Hub repo id"):
        parse_repo(spec)
    code, text = in_process("hub", "pull", spec, capsys=capsys)
    assert code == 2 and "is not a Hub repo id" in text and "Hint:" in text
    assert parse_repo("hf://org/name@v1") == ("org/name", "v1") and parse_repo("org/name") == ("org/name", None)


@pytest.mark.parametrize("spec", ["org/.", "org/.hidden", "org/name@../x", "org/name@a//b", "org/name@/abs", "org/name@a\nb"])
def test_repo_ids_that_would_name_a_path(spec):
    """The name is pull's default output folder and the revision a file under the cache's refs/."""
    with pytest.raises(ConfigError, match="is not a Hub repo id"):
        parse_repo(spec)
    assert parse_repo("org/name@refs/pr/1") == ("org/name", "refs/pr/1") and parse_repo("org/v1.0@v1.0+b") == ("org/v1.0", "v1.0+b")


def test_verify_report_belongs_to_the_checkpoint(tmp_path):
    from vitctl.hub import find_verify_report

    for d in ("run/torch", "run/other", "solo"):
        (tmp_path / d).mkdir(parents=True)
    report = {"a": {"path": "/elsewhere/jax"}, "b": {"path": "/elsewhere/torch"}, "passed": True}
    (tmp_path / "run/verify.json").write_text(json.dumps(report))
    assert find_verify_report(tmp_path / "run/torch") == report  # a side with its name
    assert find_verify_report(tmp_path / "run/other") is None  # not one of the report's sides
    (tmp_path / "solo/verify.json").write_text(json.dumps({**report, "passed": False}))
    assert find_verify_report(tmp_path / "solo")["passed"] is False  # its own report, whatever the sides
    (tmp_path / "solo/verify.json").write_text("{not json")
    assert find_verify_report(tmp_path / "solo") is None


def test_probe_takes_an_hf_uri(hub, vitctl, tmp_path):
    """`vitctl probe hf://...` fetches the checkpoint (pinned) and probes it like a local directory."""
    sha = hub.seed(REPO, repo_files(torch_ckpt(tmp_path / "src")))
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 255, (40, CFG.image_size, CFG.image_size, 3), dtype=np.uint8), labels=np.arange(40) % 2)
    env = {"VITCTL_CACHE": str(tmp_path / "cache")}
    r = vitctl("probe", f"hf://{REPO}@{sha}", "--data", data, "--mode", "fewshot", "--shots", "1,5", "--seeds", "1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fewshot"]["5"]["train_size"] == 10
    no_token(r)


@pytest.mark.slow
def test_demo_pushes_to_the_endpoint_it_is_given(hub, vitctl, tmp_path):
    """`vitctl demo --endpoint URL` ends by pushing the PyTorch checkpoint, its card carrying the verify report."""
    r = vitctl("demo", "--out", tmp_path / "demo", "--steps", "2", "--endpoint", hub.url, "--repo-id", REPO, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "[5/5] push" in r.stderr and f"push:    {REPO} @ {hub.repos[REPO].branches['main']}" in r.stdout
    card = hub.content(REPO, "main", "README.md").decode()
    assert "verify" in card.lower() and "passed" in card
    assert hub.content(REPO, "main", "model.safetensors") == (tmp_path / "demo/torch/model.safetensors").read_bytes()
    no_token(r)
