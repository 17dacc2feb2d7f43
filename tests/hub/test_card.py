"""What `vitctl hub push` publishes: no local path in any file, a model card that the Hub's own parser
reads (license, tags, model-index), metrics and class names from the run, loading snippets that run,
timm exports that timm loads from the Hub; 404 and Xet failures reported as what they are."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_params
from tests.hub.conftest import CFG, TOKEN
from vitctl import checkpoint as ckpt
from vitctl.formats import layout

REPO = "me/run"
CLASSES = [f"digit {i}" for i in range(CFG.num_classes)]


def uploaded(hub, repo: str) -> dict[str, bytes]:
    return {p: hub.content(repo, "main", p) for p in hub.commit_files(repo, "main")}


def leaks(files: dict[str, bytes], *local: Path) -> list[str]:
    """Files whose bytes name one of the local directories, the home directory, or a temporary."""
    markers = [str(p).encode() for p in local] + [os.path.expanduser("~").encode(), b".tmp-"]
    return [f"{name}: {m.decode()}" for name, data in files.items() for m in markers if m in data]


def make_run(root: Path) -> Path:
    """A run directory as `vitctl demo` builds it, through the real writers: inside atomic_output's
    temporary, a trained-like JAX checkpoint (write_config, as train writes it, with the model file,
    data, step, test accuracy and class names), converted by `vitctl.convert` to torch/; after the
    rename, verify.json and probe.json beside them naming absolute paths, as verify and probe do."""
    from vitctl.convert.convert import convert

    with ckpt.atomic_output(root) as tmp:
        (tmp / "model.json").write_text(CFG.to_json())
        (tmp / "jax").mkdir()
        layout.save_jax(tmp / "jax", random_params(CFG, 0))
        provenance = {"source_format": "train", "source": str(tmp / "model.json"), "created_by": "vitctl train", "data": "digits",
                      "step": 40, "test_accuracy": 0.875, "class_names": CLASSES}  # fmt: skip
        ckpt.write_config(tmp / "jax", CFG, provenance)
        convert(tmp / "jax", tmp / "torch", "jax-to-torch")
        assert ".tmp-" in str(tmp)
    run = root.absolute()
    verify = {"a": {"path": str(run / "jax")}, "b": {"path": str(run / "torch")}, "passed": True, "max_abs": 2.4e-7,
              "tolerance": 1e-5, "rtol": 1e-5, "first_divergent": None, "settings": {"precision": "fp32"}}  # fmt: skip
    probe = {"checkpoint": {"path": str(run / "torch"), "format": "vitctl-torch"}, "data": "digits", "layer": "pre_logits",
             "pool": "map", "backend": "torch", "train_size": 1437, "test_size": 360, "linear": {"accuracy": 0.9},
             "fewshot": {"5": {"accuracy": 0.61}}, "cache_file": os.path.expanduser("~/.cache/vitctl/probe/x.npz")}  # fmt: skip
    ckpt.write_json(root / "verify.json", verify)
    ckpt.write_json(root / "probe.json", probe)
    return root


def card_parts(card: str):
    from huggingface_hub import ModelCard

    parsed = ModelCard(card)  # the Hub client's own parser: raises on malformed metadata (model-index included)
    blocks = re.findall(r"```(\w+)\n(.*?)```", parsed.text, re.DOTALL)
    return parsed.data, parsed.text, blocks


def test_push_of_a_converted_run_publishes_no_local_path_and_a_full_card(hub, vitctl, tmp_path):
    run = make_run(tmp_path / "runs/demo")
    local = json.loads((run / "torch/config.json").read_text())["provenance"]
    assert local["source"] == "jax" and local["source_provenance"]["source"] == "model.json"  # the writers stored names
    r = vitctl("hub", "push", run / "torch", REPO, "--license", "apache-2.0", "--json")
    assert r.returncode == 0, r.stderr
    files = uploaded(hub, REPO)
    assert set(files) >= {"config.json", "model.safetensors", "README.md", "verify.json", "probe.json"}
    assert leaks(files, tmp_path) == []
    assert json.loads(files["verify.json"])["a"] == {"path": "jax"} and json.loads(files["probe.json"])["cache_file"] == "x.npz"

    data, text, blocks = card_parts(files["README.md"].decode())
    assert "&id0" not in files["README.md"].decode() and "- `probe.json`" in text  # no YAML aliases; the reports listed
    assert data.license == "apache-2.0" and data.library_name == "vitctl" and {"vitctl", "pytorch", "safetensors"} <= set(data.tags)
    results = {(e.dataset_name, e.metric_name): e.metric_value for e in data.eval_results}
    assert results[("digits", "test accuracy (vitctl train)")] == 0.875
    assert results[("digits", "linear probe accuracy (pre_logits)")] == 0.9 and results[("digits", "5-shot accuracy (pre_logits)")] == 0.61
    meta = data.to_dict()["vitctl"]
    assert meta["class_names"] == CLASSES and meta["training"] == {"data": "digits", "step": 40, "test_accuracy": 0.875}
    assert meta["verify"]["passed"] is True and meta["probe"]["linear_accuracy"] == 0.9 and meta["format"] == "vitctl-torch"
    assert "**87.50%**" in text and "`digit 9`" in text and "`vitctl verify` passed" in text

    # The Python snippet runs as written, on a pulled copy named as the card says.
    (python,) = [code for lang, code in blocks if lang == "python"]
    pull = vitctl("hub", "pull", REPO, "--out", tmp_path / "use/run", "--backend", "torch")
    assert pull.returncode == 0, pull.stderr
    check = "\nx = torch.zeros(1, 3, 16, 16).normal_()\nprint(float(model(x)[0].abs().max()))\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", python + check], cwd=tmp_path / "use", capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0
    assert leaks({"pulled config.json": (tmp_path / "use/run/config.json").read_bytes()}, tmp_path) == []


def test_push_scrubs_an_old_config_and_refuses_other_files_with_local_paths(hub, vitctl, tmp_path):
    """config.json of an older vitctl (absolute provenance) goes up scrubbed, said in --json; an index
    naming a temporary (a file uploaded as it is) refuses the push before anything is sent."""
    from tests.hub.conftest import torch_ckpt

    src = torch_ckpt(tmp_path / "old")
    config = json.loads((src / "config.json").read_text())
    config["provenance"] = {"source": str(tmp_path / ".old.tmp-1a2b3c4d/jax"), "data": str(Path.home() / "photos")}
    (src / "config.json").write_text(json.dumps(config))  # as vitctl wrote it before provenance was public
    r = vitctl("hub", "push", src, REPO, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["scrubbed"] == ["config.json"]
    assert json.loads(hub.content(REPO, "main", "config.json"))["provenance"] == {"source": "jax", "data": "photos"}
    assert leaks(uploaded(hub, REPO), tmp_path) == []

    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["metadata"]["converted_from"] = str(tmp_path / ".x.tmp-99/model")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    before = hub.repos[REPO].branches["main"]
    r = vitctl("hub", "push", src, REPO)
    assert r.returncode == 1 and "model.safetensors.index.json holds the local path" in r.stderr and "Hint:" in r.stderr
    assert hub.repos[REPO].branches["main"] == before and r.stdout == ""  # nothing committed


def test_timm_export_on_the_hub_loads_with_timm_and_pulls(hub, vitctl, tmp_path):
    """A timm export pushed: its card says timm and carries the hf-hub: call, which timm runs against
    this Hub; vitctl pulls it (config checked against timm's names), and --backend jax names what it is."""
    pytest.importorskip("timm")
    run = make_run(tmp_path / "run")
    conv = vitctl("convert", "jax-to-torch", run / "jax", tmp_path / "timm", "--format", "timm", "--json")
    assert conv.returncode == 0, conv.stderr
    assert json.loads((tmp_path / "timm/config.json").read_text())["label_names"] == CLASSES  # timm's own field
    r = vitctl("hub", "push", tmp_path / "timm", "me/timm")
    assert r.returncode == 0, r.stderr
    data, text, blocks = card_parts(hub.content("me/timm", "main", "README.md").decode())
    assert data.library_name == "timm" and "timm" in data.tags and data.to_dict()["vitctl"]["format"] == "timm"
    (python,) = [code for lang, code in blocks if lang == "python"]
    assert 'timm.create_model("hf-hub:me/timm", pretrained=True)' in python and '"local-dir:timm", pretrained=True' in text

    pull = vitctl("hub", "pull", "me/timm", "--out", tmp_path / "timm-pulled", "--backend", "torch")
    assert pull.returncode == 0, pull.stderr
    info = vitctl("info", tmp_path / "timm-pulled", "--json")
    assert json.loads(info.stdout)["formats"] == ["timm"]
    check = (
        "\nimport torch\nx = torch.zeros(2, 3, 16, 16).normal_(generator=torch.Generator().manual_seed(0))\n"
        f"local = timm.create_model('local-dir:{tmp_path / 'timm-pulled'}', pretrained=True).eval()\n"
        "with torch.no_grad():\n    a, b = model(x), local(x)\nprint(bool(torch.equal(a, b)), float(a.abs().max()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-timm"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1")
    out = subprocess.run([sys.executable, "-c", python + check], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    same, scale = out.stdout.split()
    assert same == "True" and float(scale) > 0

    jax = vitctl("hub", "pull", "me/timm", "--out", tmp_path / "no", "--backend", "jax")
    assert jax.returncode == 1 and "is a timm export (written by --format timm)" in jax.stderr and "hf-hub:me/timm@" in jax.stderr
    assert not (tmp_path / "no").exists()
    assert "vitctl convert torch-to-jax` reads it" in jax.stderr
    conv = vitctl("convert", "torch-to-jax", "hf://me/timm", tmp_path / "jax")  # timm checkpoints are convert sources
    assert conv.returncode == 0, conv.stderr
    assert json.loads(vitctl("info", tmp_path / "jax", "--json").stdout)["formats"] == ["vitctl-jax"]
    same = vitctl("verify", tmp_path / "jax", tmp_path / "timm-pulled")
    assert same.returncode == 0, same.stdout + same.stderr


def test_not_found_says_repo_or_revision(hub, vitctl, tmp_path):
    from tests.hub.conftest import repo_files, torch_ckpt

    hub.seed(REPO, repo_files(torch_ckpt(tmp_path / "src")))
    repo = vitctl("hub", "pull", "me/nope", "--out", tmp_path / "a")
    assert repo.returncode == 1 and f"repo me/nope not found on {hub.url} (HTTP 404" in repo.stderr
    assert "check the repo id" in repo.stderr and "--endpoint" in repo.stderr and "HF_TOKEN" in repo.stderr
    rev = vitctl("hub", "pull", f"{REPO}@nobranch", "--out", tmp_path / "b")
    assert rev.returncode == 1 and f"revision 'nobranch' not found in {REPO} on {hub.url}" in rev.stderr and "Hint:" in rev.stderr
    info = vitctl("info", f"hf://{REPO}@nobranch")
    assert info.returncode == 1 and "revision 'nobranch' not found" in info.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert all(TOKEN not in r.stderr for r in (repo, rev, info))


def test_xet_failures_are_named_with_the_way_around():
    """hf_xet's exceptions (and huggingface_hub's XetDownloadError), however wrapped, map to a Xet
    transfer failure with HF_HUB_DISABLE_XET in the hint; other failures are not taken for one."""
    hf_xet = pytest.importorskip("hf_xet")
    from huggingface_hub.errors import XetDownloadError

    from vitctl import hub

    for exc in (hf_xet.XetObjectNotFoundError("xorb 1f2e not found"), hf_xet.XetAuthenticationError("token expired"),
                XetDownloadError("reconstruction failed")):  # fmt: skip
        try:
            try:
                raise exc
            except Exception as inner:
                raise RuntimeError("download failed") from inner
        except RuntimeError as wrapped:
            assert hub.xet_failure(wrapped) is exc
            with pytest.raises(hub.HubError) as e, hub._hub_errors(REPO, "main", "https://hub.example"):
                raise wrapped  # noqa: TRY201  (the wrapped error, as huggingface_hub raises it)
        assert e.value.message.startswith(f"Xet transfer failure on {REPO}@main (https://hub.example): {type(exc).__name__}")
        assert "HF_HUB_DISABLE_XET=1" in e.value.hint
        assert ("HF_TOKEN" in e.value.hint) == isinstance(exc, PermissionError)  # an expired or refused token: say which
    assert hub.xet_failure(FileNotFoundError("no such file")) is None and hub.xet_failure(ValueError("x")) is None


def test_card_metrics_come_from_the_lineage(tmp_path):
    """A pulled copy of a converted checkpoint of a trained one: test accuracy and class names are
    found two provenance levels down; none of them claimed when absent."""
    from vitctl.hub.card import training

    pulled = {"created_by": "vitctl hub pull", "upstream": {"created_by": "vitctl convert jax-to-torch", "source_provenance": {
        "created_by": "vitctl train", "data": "digits", "step": 7, "test_accuracy": 0.5, "class_names": CLASSES}}}  # fmt: skip
    assert training(pulled, CFG.num_classes) == {"data": "digits", "step": 7, "test_accuracy": 0.5, "class_names": CLASSES}
    assert training({"created_by": "vitctl init", "source": "tiny"}, CFG.num_classes) == {}
    assert "class_names" not in training({"class_names": CLASSES[:3]}, CFG.num_classes)  # not one per class: not shown
    assert np.isclose(training({"test_accuracy": 0.25}, 10)["test_accuracy"], 0.25)


def test_card_states_the_bar_each_precision_was_judged_by(tmp_path):
    """A bf16 verify report is judged by relative RMS error (no max-abs tolerance): the card says so."""
    from vitctl.hub.card import model_card

    run = make_run(tmp_path / "run")
    cfg = layout.read_checkpoint_config(run / "jax")
    fp32 = {"passed": True, "max_abs": 2e-6, "tolerance": 1e-5, "rel_tol": None, "settings": {"precision": "fp32"}}
    bf16 = {"passed": True, "max_abs": 0.125, "tolerance": None, "rel_rms": 8.5e-3, "rel_tol": 0.05, "rel_rms_layer": "pre_logits",
            "settings": {"precision": "bf16"}}  # fmt: skip
    card = model_card(run / "jax", cfg, "me/x", {}, fp32)
    assert "logits max-abs difference 2e-06 (tolerance 1e-05, precision fp32)" in card
    card = model_card(run / "jax", cfg, "me/x", {}, bf16)
    assert "worst relative RMS error 0.0085 (bar 0.05, precision bf16)" in card and "tolerance None" not in card
