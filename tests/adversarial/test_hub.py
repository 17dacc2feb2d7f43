"""`vitctl hub pull|push` against a hostile or broken Hub: the real huggingface_hub client and
the loopback server of tests/hub/server.py, serving what a stranger's repo could hold.

Every refused case checks (`assert_refused`) the exit code, one `Error:` line naming the repo
and the file, no traceback, nothing written outside the output (the Hugging Face cache,
`hf-home/`, is the one place a pull may write besides it), no partial output and no
leftover temporary; pulls refused on names also check that nothing was downloaded.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adversarial.conftest import assert_refused, env_for, leftovers, run_vitctl, start_vitctl, wait_for
from tests.hub.conftest import CFG, TOKEN, repo_files, torch_ckpt

REPO = "me/evil"
CACHE = "hf-home"  # the Hugging Face cache inside the sandbox: a pull may write there
OUT = "out"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, bytes]:
    """config.json + one model.safetensors of a tiny model."""
    return repo_files(torch_ckpt(tmp_path_factory.mktemp("single") / "ckpt", max_shard_bytes=None))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, bytes]:
    """config.json + an index and its shards."""
    return repo_files(torch_ckpt(tmp_path_factory.mktemp("sharded") / "ckpt"))


@pytest.fixture
def env(hub, sandbox) -> dict:
    return {"HF_HOME": str(sandbox.root / CACHE), "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": None}  # fmt: skip


def pull(sandbox, env, *args):
    sandbox.before()
    return run_vitctl("hub", "pull", REPO, "--out", OUT, *args, cwd=sandbox.root, env=env)


def refused_pull(r, sandbox, hub, says, code=1, downloaded=True):
    """A refused pull: nothing but the cache changed, no output; `downloaded=False`: not one file fetched."""
    assert_refused(r, sandbox, code=code, allowed=(CACHE,), says=says)
    assert not (sandbox.root / OUT).exists()
    if not downloaded:
        assert hub.requests(path_part="/resolve/") == []


def config_bytes(cfg=CFG, **model) -> bytes:
    return json.dumps({"vitctl_version": "0.1.0", "model": {**cfg.to_dict(), **model}, "provenance": {}}).encode()


# Names from the listing.
@pytest.mark.parametrize(
    "name",
    [
        "params/../../x/config.json",  # wrote next to --out before
        "../config.json",
        "/tmp/vitctl-abs/config.json",
        "params//x",
        "params/./x",
        "params/a\x1bb",
        "params/a\nb",
        "docs/../../../x.md",  # not one the backend needs: every listed name is checked
    ],
)
def test_hostile_names_in_the_listing(hub, env, sandbox, single, name):
    hub.seed(REPO, {**single, name: b"{}"})
    r = pull(sandbox, env)
    refused_pull(r, sandbox, hub, says=repr(name), downloaded=False)
    assert REPO in r.stderr and not (sandbox.root / "x").exists()


def test_a_file_that_is_also_a_folder(hub, env, sandbox, single):
    hub.seed(REPO, {**single, "params": b"x", "params/_METADATA": b"{}"})
    refused_pull(pull(sandbox, env), sandbox, hub, says="both as a file and as the folder", downloaded=False)


def test_index_names_a_shard_outside_the_checkpoint(hub, env, sandbox, sharded):
    index = json.loads(sharded["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../escape.safetensors"
    hub.seed(REPO, {**sharded, "model.safetensors.index.json": json.dumps(index).encode()})
    r = pull(sandbox, env)
    refused_pull(r, sandbox, hub, says="model.safetensors.index.json names the file '../../escape.safetensors'")
    assert not any("escape" in p for m, p, s in hub.log)


def test_index_names_a_shard_the_repo_does_not_list(hub, env, sandbox, sharded):
    hub.seed(REPO, sharded)
    hub.hidden.add("model-00003-of-00009.safetensors")  # served if asked: vitctl must not ask
    r = pull(sandbox, env)
    refused_pull(r, sandbox, hub, says="model-00003-of-00009.safetensors: named by model.safetensors.index.json")
    assert hub.requests(path_part="model-00003") == []


def test_a_listed_file_that_is_not_served(hub, env, sandbox, single):
    hub.seed(REPO, single)
    hub.unserved.add("model.safetensors")
    refused_pull(pull(sandbox, env), sandbox, hub, says="model.safetensors of me/evil@")


def test_unlisted_and_late_files_are_never_fetched(hub, env, sandbox, single):
    """Files the server hides from the listing, or adds to a later one, stay on the server: a pull
    lists the repo once and copies exactly what that listing named."""
    hub.seed(REPO, {**single, "params/hidden": b"not listed", "model-00001-of-00001.safetensors": b"late"})
    hub.hidden.add("params/hidden")
    hub.late.add("model-00001-of-00001.safetensors")
    r = pull(sandbox, env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (sandbox.root / OUT).iterdir() if not p.name.startswith(".")) == sorted(single)
    assert hub.tree_calls == 1 and hub.requests(path_part="hidden") == [] and hub.requests(path_part="model-00001") == []
    assert sandbox.changed(allowed=(CACHE, OUT)) == [] and leftovers(sandbox.root) == []


# Headers that huggingface_hub turns into cache paths.
@pytest.mark.parametrize(
    ("header", "value"), [("ETag", '"../../../../escape"'), ("X-Linked-Etag", '"../../../../escape"'), ("X-Repo-Commit", "../../../escape")]
)
def test_headers_that_would_name_a_file_outside_the_cache(hub, env, sandbox, single, header, value):
    hub.seed(REPO, single)
    hub.headers["model.safetensors"] = {header: value}
    refused_pull(pull(sandbox, env), sandbox, hub, says=f"{header}: {value!r}")
    assert not list(sandbox.root.rglob("escape*"))


def test_a_commit_id_that_is_a_path(hub, env, sandbox, single):
    hub.seed(REPO, single)
    hub.fake_sha = "../../../escape"
    refused_pull(pull(sandbox, env), sandbox, hub, says="is not a commit id", downloaded=False)


# config.json.
@pytest.mark.parametrize(
    ("config", "says"),
    [
        (b"{not json", "config.json is not valid JSON"),
        (b"[1, 2, 3]", "config.json must hold a JSON object, got list"),
        (b'{"model": ' * 100_000 + b"1" + b"}" * 100_000, "config.json nests JSON"),
        (json.dumps({"model": {"width": "wide"}}).encode(), "config.json does not describe a vitctl model"),
    ],
    ids=["not-json", "list", "deep", "not-a-model"],
)
def test_config_that_is_not_a_model_config(hub, env, sandbox, single, config, says):
    hub.seed(REPO, {**single, "config.json": config})
    r = pull(sandbox, env)
    refused_pull(r, sandbox, hub, says=says)
    assert f"{REPO}@" in r.stderr


def test_config_that_disagrees_with_the_weights(hub, env, sandbox, single):
    wider = dataclasses.replace(CFG, width=CFG.width * 2, mlp_dim=CFG.mlp_dim * 2)
    hub.seed(REPO, {**single, "config.json": config_bytes(wider)})
    refused_pull(pull(sandbox, env), sandbox, hub, says="model.safetensors does not match the model config")


def test_config_with_a_huge_depth(hub, env, sandbox, single):
    """A million layers in a 1 KB config: refused from the tensor names, before building a name per layer."""
    hub.seed(REPO, {**single, "config.json": config_bytes(depth=10**6)})
    sandbox.before()
    r = run_vitctl("hub", "pull", REPO, "--out", OUT, cwd=sandbox.root, env=env, memory=3 * 2**30)
    refused_pull(r, sandbox, hub, says="config.json")


# Endpoints.
@pytest.mark.parametrize("endpoint", ["file:///etc", "not a url", "ftp://x", "http://", "http://host:port"])
def test_invalid_endpoint_is_a_usage_error(hub, env, sandbox, endpoint):
    r = pull(sandbox, env, "--endpoint", endpoint)
    refused_pull(r, sandbox, hub, says="--endpoint must be an http(s) URL", code=2, downloaded=False)
    assert hub.log == []


def test_invalid_hf_endpoint_is_a_usage_error(hub, env, sandbox):
    src = torch_ckpt(sandbox.root / "src")
    sandbox.before()
    r = run_vitctl("hub", "push", src, REPO, cwd=sandbox.root, env={**env, "HF_ENDPOINT": "file:///etc"})
    assert_refused(r, sandbox, code=2, says="HF_ENDPOINT must be an http(s) URL")
    assert hub.log == []


# Interruptions.
def test_sigterm_while_downloading(hub, env, sandbox, single):
    """SIGTERM while a file is on its way: exit 130, no output, no temporary."""
    hub.seed(REPO, single)
    block = hub.block("model.safetensors")
    sandbox.before()
    proc = start_vitctl("hub", "pull", REPO, "--out", OUT, cwd=sandbox.root, env=env)
    wait_for(block.reached.is_set, proc, "the download of model.safetensors")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    block.release.set()
    assert proc.returncode == 130, err
    assert "Interrupted: nothing was written." in err and "Traceback" not in err and "Error:" not in err
    assert not (sandbox.root / OUT).exists()
    assert sandbox.changed(allowed=(CACHE,)) == [] and leftovers(sandbox.root) == []


def test_sigterm_while_writing_the_output(hub, env, sandbox, single):
    """SIGTERM after the first file is copied into the temporary output: it is removed."""
    hub.seed(REPO, single)
    code = (
        "import os, shutil, signal, sys\n"
        "copy = shutil.copyfile\n"
        "def copy_then_term(*a, **k):\n"
        "    copy(*a, **k)\n"
        "    if not any(p.name.startswith('.out.tmp-') for p in __import__('pathlib').Path('.').iterdir()):\n"
        "        sys.exit('no temporary output while copying')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "shutil.copyfile = copy_then_term\n"
        "from vitctl.cli import main\n"
        f"main(['hub', 'pull', {REPO!r}, '--out', {OUT!r}])\n"
    )
    sandbox.before()
    p = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=sandbox.root, env=env_for(env), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 130, p.stderr
    assert "Interrupted: nothing was written." in p.stderr and "Traceback" not in p.stderr
    assert not (sandbox.root / OUT).exists()
    assert sandbox.changed(allowed=(CACHE,)) == [] and leftovers(sandbox.root) == []


# --force.
def test_pull_force_does_not_replace_a_users_folder(hub, env, sandbox, single):
    """A web app's folder that happens to hold a config.json (even a vitctl one) is not vitctl's output."""
    hub.seed(REPO, single)
    site = sandbox.root / OUT
    (site / "src").mkdir(parents=True)
    (site / "thesis.tex").write_text("\\documentclass{article}")
    (site / "src/main.py").write_text("print('hi')")
    (site / "config.json").write_bytes(single["config.json"])
    r = pull(sandbox, env, "--force")
    assert_refused(r, sandbox, code=2, allowed=(CACHE,), says=str(OUT))
    assert (site / "thesis.tex").is_file() and (site / "src/main.py").is_file()
    assert hub.requests(path_part="/resolve/") == []


def test_pull_force_replaces_its_own_output(hub, env, sandbox, single, sharded):
    """The other side of the rule: a pull (model card included) is vitctl's, so --force replaces it."""
    hub.seed(REPO, single)
    hub.seed(REPO, {**single, "README.md": b"# evil\n"})
    assert pull(sandbox, env).returncode == 0
    hub.seed(REPO, sharded)
    r = pull(sandbox, env, "--force", "--backend", "torch")
    assert r.returncode == 0, r.stderr
    assert (sandbox.root / OUT / "model.safetensors.index.json").is_file() and sandbox.changed(allowed=(CACHE, OUT)) == []
    assert leftovers(sandbox.root) == []


# Push: only the checkpoint's own files leave the machine.
def _push(sandbox, env, ckpt, *args):
    sandbox.before()
    return run_vitctl("hub", "push", ckpt, REPO, *args, cwd=sandbox.root, env=env)


def _nothing_uploaded(hub):
    assert REPO not in hub.repos and hub.requests("PUT") == [] and hub.requests("POST", "/commit/") == []


@pytest.mark.parametrize("link", ["params/secret", "config.json", "model.safetensors"])
def test_push_refuses_a_symlink_out_of_the_checkpoint(hub, env, sandbox, link):
    from tests.conftest import random_params
    from vitctl.formats import layout

    src = torch_ckpt(sandbox.root / "src", max_shard_bytes=None)
    layout.save_jax(src, random_params(CFG, 0))
    secret = sandbox.root / "secret"
    secret.write_bytes((src / link).read_bytes() if (src / link).is_file() else b"ssh-rsa AAAA private")
    (src / link).unlink(missing_ok=True)
    (src / link).symlink_to(secret)
    r = _push(sandbox, env, src, "--include-jax")
    assert_refused(r, sandbox, says=f"{src / link} is a symlink that leads outside the checkpoint")
    _nothing_uploaded(hub)


def test_push_refuses_an_index_that_names_a_shard_outside(hub, env, sandbox):
    src = torch_ckpt(sandbox.root / "src")
    (sandbox.root / "secret.safetensors").write_bytes(b"private")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../secret.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(_push(sandbox, env, src), sandbox, says="'../secret.safetensors'")
    _nothing_uploaded(hub)


def test_push_from_the_hugging_face_cache(hub, env, sandbox, single):
    """A pulled snapshot's files are symlinks into ../../blobs: pushed as they are; one that leads
    out of that repo's cache folder is refused."""
    hub.seed("me/src", single)
    assert run_vitctl("hub", "pull", "me/src", "--out", "pulled", cwd=sandbox.root, env=env).returncode == 0
    snap = next((sandbox.root / CACHE / "hub/models--me--src/snapshots").iterdir())
    assert (snap / "model.safetensors").is_symlink()
    r = run_vitctl("hub", "push", snap, REPO, cwd=sandbox.root, env=env)
    assert r.returncode == 0, r.stderr
    assert hub.content(REPO, "main", "model.safetensors") == single["model.safetensors"]

    other = sandbox.root / "elsewhere.json"
    other.write_bytes(single["config.json"])
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(other)
    r = run_vitctl("hub", "push", snap, "me/again", cwd=sandbox.root, env=env)
    assert r.returncode == 1 and "leads outside the checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "me/again" not in hub.repos


def test_push_does_not_follow_a_symlinked_verify_report(hub, env, sandbox):
    src = torch_ckpt(sandbox.root / "src", max_shard_bytes=None)
    (sandbox.root / "notes.json").write_text(json.dumps({"passed": True, "private": "do not upload"}))
    os.symlink(sandbox.root / "notes.json", src / "verify.json")
    assert_refused(_push(sandbox, env, src), sandbox, says="verify.json is a symlink that leads outside")
    _nothing_uploaded(hub)


def test_pull_writes_exactly_the_listing(hub, env, sandbox, sharded):
    """The ordinary case, checked the same way: every listed file, nothing else, nothing outside."""
    hub.seed(REPO, sharded)
    r = pull(sandbox, env, "--backend", "torch")
    assert r.returncode == 0, r.stderr
    out = sandbox.root / OUT
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if not p.name.startswith(".")} == set(sharded)
    assert all((out / f).read_bytes() == b for f, b in sharded.items() if f != "config.json")
    assert sandbox.changed(allowed=(CACHE, OUT)) == [] and leftovers(sandbox.root) == []
    assert Path(r.stdout.strip()).name == OUT
