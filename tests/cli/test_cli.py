"""The command line: stdout/stderr separation, exit codes, import hygiene, paper counts."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import TINY
from vitctl.cli import app
from vitctl.cli.models import sizes
from vitctl.config import PRESETS, ViTConfig
from vitctl.convert.mapping import jax_to_torch
from vitctl.errors import OutputExistsError
from vitctl.formats import layout

# Runs the CLI in a fresh interpreter and, at exit, reports which frameworks it imported
# and its peak RSS on the last stderr line.
WRAPPER = """
import atexit, json, resource, sys
def report():
    heavy = sorted(m for m in ("jax", "torch", "flax", "orbax") if m in sys.modules)
    sys.stderr.write("\\nREPORT " + json.dumps({"heavy": heavy, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\\n")
atexit.register(report)
from vitctl.cli import main
main(sys.argv[1:])
"""


def run(*args):
    return subprocess.run([sys.executable, "-m", "vitctl", *map(str, args)], capture_output=True, text=True, check=False)


def run_reported(*args):
    p = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True, check=False)
    stderr, _, report = p.stderr.rpartition("REPORT ")
    return p, stderr, json.loads(report)


def assert_error(p, code, what):
    """Exit `code`, nothing on stdout, exactly one `Error:` line naming `what`, then a hint; no traceback."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("Error:")] == lines[:1], p.stderr
    assert what in lines[0], lines[0]
    assert len(lines) == 2 and lines[1].startswith("Hint: "), p.stderr
    assert "Traceback" not in p.stderr


# Import hygiene: `vitctl --help`, `models` and `info` load neither jax nor torch.
def test_shared_modules_import_no_framework():
    code = "import sys, vitctl.config, vitctl.convert.mapping; print([m for m in ('jax', 'torch') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["--help"], ["models", "--json"], ["info", "vit-22b"]])
def test_commands_import_no_framework(args):
    p, _, report = run_reported(*args)
    assert p.returncode == 0, p.stderr
    assert report["heavy"] == []


def test_version_imports_no_framework():
    """`vitctl --version` (and -V) prints `vitctl X.Y.Z`, the package's version, and loads neither jax nor torch."""
    import vitctl

    for flag in ("--version", "-V"):
        p, stderr, report = run_reported(flag)
        assert p.returncode == 0, stderr
        assert p.stdout == f"vitctl {vitctl.__version__}\n" and re.fullmatch(r"\d+\.\d+\.\d+", vitctl.__version__)
        assert report["heavy"] == []


def test_help_and_examples(cli):
    p = cli("--help")
    assert p.returncode == 0 and all(c in p.stdout for c in ("models", "info", "init"))
    assert cli().returncode == 2  # no_args_is_help: the help, as a usage error
    for cmd in ("models", "info", "init"):
        p = cli(cmd, "-h")
        assert p.returncode == 0 and "Examples:" in p.stdout and f"vitctl {cmd}" in p.stdout


def test_models_json():
    p = run("models", "--json")
    assert p.returncode == 0, p.stderr
    models = json.loads(p.stdout)["models"]  # the whole of stdout is one JSON object
    assert [m["name"] for m in models] == list(PRESETS)
    for m in models:
        assert set(m) == {"name", "params_total", "config"}
        assert ViTConfig.from_dict(m["config"]) == PRESETS[m["name"]]
    assert next(m for m in models if m["name"] == "vit-22b")["params_total"] == 22_209_725_416


def test_models_table():
    p = run("models")
    assert p.returncode == 0 and "vit-22b" in p.stdout and "22,209,725,416" in p.stdout


def test_info_vit22b_counts_and_resources():
    p, stderr, report = run_reported("info", "vit-22b", "--json")
    assert p.returncode == 0, stderr
    info = json.loads(p.stdout)
    assert set(info) == {
        "name",
        "config",
        "params_total",
        "params_block_matmul",
        "params_head",
        "params_encoder",
        "bytes_float32",
        "bytes_bfloat16",
    }
    assert info["name"] == "vit-22b" and ViTConfig.from_dict(info["config"]) == PRESETS["vit-22b"]
    # arXiv:2302.05442: 48 * (4*D^2 + 2*D*F) block-matmul parameters, exactly.
    assert info["params_block_matmul"] == 48 * (4 * 6144**2 + 2 * 6144 * 24576) == 21_743_271_936
    assert info["params_total"] == info["params_encoder"] + info["params_head"]
    assert info["bytes_float32"] == 4 * info["params_total"] and info["bytes_bfloat16"] == 2 * info["params_total"]
    assert report["maxrss_kib"] < 1.5 * 2**20  # KiB: under 1.5 GiB; no weights allocated
    assert report["heavy"] == []


def counts(name):
    p = CliRunner().invoke(app, ["info", name, "--json"])
    assert p.exit_code == 0, p.output
    return json.loads(p.stdout)


def close(ours, paper_millions, rel=1e-3):
    return abs(ours / (paper_millions * 1e6) - 1) < rel


def test_paper_parameter_counts():
    # ViT-22B, arXiv:2302.05442 Table 1: "21,743M". That is the block matmuls to the
    # million (21,743,271,936); the paper counts the encoder. Our encoder adds the patch
    # embedding, position embedding, norms and MLP/attn-out biases (+7.3M, 0.03%); our
    # MAP head (~453M) and 1000-class classifier are not in the paper's figure.
    g = counts("vit-22b")
    assert round(g["params_block_matmul"] / 1e6) == 21_743
    assert close(g["params_encoder"], 21_743)
    assert not close(g["params_total"], 21_743)  # +2.1%: the head is not counted

    # ViT-G/14, arXiv:2106.04560 Table 2: "1,843M" is the encoder (1,842.77M here, -0.01%);
    # with our MAP head and classifier the total is 1,882.8M (+2.2%), so the paper excludes the head.
    g = counts("vit-G/14")
    assert close(g["params_encoder"], 1_843)
    assert not close(g["params_total"], 1_843)
    assert not close(g["params_block_matmul"], 1_843)  # -0.15%: the embeddings and norms are counted

    # ViT-e/14, arXiv:2209.06794: "3,926M" is NOT the encoder (3,805.4M, -3.1%) nor the
    # encoder + MAP head (3,873.3M, -1.3%). It matches encoder + MAP head + a classifier
    # of about 29.4k classes (1,793 parameters per class): the JFT label set (~30k
    # classes) it was pre-trained on. Solving for the class count:
    e = counts("vit-e/14")
    assert not close(e["params_encoder"], 3_926, rel=0.01)
    classifier_per_class = PRESETS["vit-e/14"].width + 1
    body = e["params_total"] - 1000 * classifier_per_class  # encoder + MAP head
    implied_classes = (3_926e6 - body) / classifier_per_class
    assert 29_000 < implied_classes < 30_000, implied_classes
    with_jft_head = sizes(dataclasses.replace(PRESETS["vit-e/14"], num_classes=29_593))
    assert close(with_jft_head["params_total"], 3_926, rel=2e-4)  # 3,926.40M: +0.01%


# Bad input: one `Error:` line, a hint, exit 2; never a traceback.
BAD_CONFIGS = {
    "width 50 is not divisible by num_heads 3": {"width": 50, "num_heads": 3},
    "image_size 30 is not divisible by patch_size 4": {"image_size": 30, "patch_size": 4},
    "unknown pool 'max'": {"pool": "max"},
    "unknown config field(s): widht": {"widht": 64},
}


@pytest.mark.parametrize("what", BAD_CONFIGS)
def test_bad_config(tmp_path, cli, what):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**dataclasses.asdict(TINY), **BAD_CONFIGS[what]}))
    assert_error(cli("info", bad), 2, what)
    assert_error(cli("init", "--config", bad, "--out", tmp_path / "out"), 2, what)
    assert not (tmp_path / "out").exists()


def test_bad_config_subprocess(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**dataclasses.asdict(TINY), "width": 50}))
    assert_error(run("init", "--config", bad, "--out", tmp_path / "out"), 2, "width 50 is not divisible by num_heads 3")


def test_unknown_preset(cli):
    p = run("info", "vit-22x")  # the real console entry point, in a subprocess
    assert_error(p, 2, "Error: unknown model preset 'vit-22x'")
    assert "vit-22b" in p.stderr  # the hint suggests the close name
    assert_error(cli("init", "vit-22x", "--out", "x"), 2, "unknown model preset 'vit-22x'")


def test_missing_config_json(tmp_path, cli):
    (tmp_path / "model.safetensors").write_bytes(b"")
    p = cli("info", tmp_path)
    assert_error(p, 1, "has no config.json")
    assert "vitctl init" in p.stderr
    assert_error(cli("info", tmp_path / "nope.json"), 2, "no such file or directory")


def test_usage_errors_exit_2(tmp_path, cli):
    assert cli("init", "vit-22b").returncode == 2  # missing --out: Typer's usage error
    assert cli("info", "vit-22b", "--bogus").returncode == 2
    assert_error(cli("init", "--out", tmp_path / "o"), 2, "exactly one of MODEL or --config")


def test_debug_shows_traceback(cli, monkeypatch):
    monkeypatch.setenv("VITCTL_DEBUG", "1")
    p = cli("info", "vit-22x")
    assert p.returncode == 2 and "Traceback" in p.stderr and "Error: unknown model preset" in p.stderr


def test_interrupt_leaves_nothing(tmp_path):
    # Ctrl-C halfway through writing the weights (no JAX needed: the init is stubbed out).
    code = (
        "import sys; import vitctl.init as m, vitctl.formats.layout as c\n"
        "def boom(d, flat): (d / 'params').mkdir(); (d / 'params' / 'half').write_text('x'); raise KeyboardInterrupt\n"
        "m._jax_init, c.save_jax = (lambda cfg, seed: {}), boom\n"
        "from vitctl.cli import main; main(sys.argv[1:])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, "init", "vit22b-mu/16", "--out", tmp_path / "o"], capture_output=True, text=True, check=False
    )
    assert p.returncode == 130, p.stderr
    assert "Interrupted" in p.stderr and "Traceback" not in p.stderr and p.stdout == ""
    assert list(tmp_path.iterdir()) == []


# init -> info, both backends from the same seed hold the same weights. In-process, so the
# JAX model compiles once for both.
@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(dataclasses.asdict(TINY)))
    return path


def invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_init_both_backends_then_info(tmp_path, tiny_json):
    pytest.importorskip("jax")
    pytest.importorskip("orbax.checkpoint")
    jax_dir, torch_dir = tmp_path / "jax", tmp_path / "torch"
    r = invoke("init", "--config", tiny_json, "--out", jax_dir, "--seed", 3)
    assert r.stdout.strip() == str(jax_dir)  # just the path on stdout; the hint goes to stderr
    r = invoke("init", "--config", tiny_json, "--out", torch_dir, "--seed", 3, "--backend", "torch", "--json")
    assert json.loads(r.stdout) == {
        "path": str(torch_dir),
        "format": layout.TORCH,
        "name": str(tiny_json),
        "params_total": 55_130,
        "seed": 3,
        "init": "jax",
    }

    flat = layout.load_jax(jax_dir, TINY)
    state = layout.load_torch(torch_dir, TINY)
    want = jax_to_torch(flat, TINY)
    assert sorted(state) == sorted(want)
    for n in want:
        np.testing.assert_array_equal(state[n], want[n], err_msg=n)

    for d, fmt in ((jax_dir, layout.JAX), (torch_dir, layout.TORCH)):
        info = json.loads(invoke("info", d, "--json").stdout)
        assert info["formats"] == [fmt] and ViTConfig.from_dict(info["config"]) == TINY
        assert info["params_total"] == 55_130
        assert info["provenance"] == {
            "source_format": "init",
            "source": tiny_json.name,  # a local file by its name only: config.json may be published
            "created_by": "vitctl init",
            "seed": 3,
            "init": "jax",
        }
        assert "vitctl-" in invoke("info", d).stdout

    # A second init into the same directory is refused, then replaced with --force.
    r = CliRunner().invoke(app, ["init", "--config", str(tiny_json), "--out", str(jax_dir), "--seed", 4])
    assert isinstance(r.exception, OutputExistsError)
    invoke("init", "--config", tiny_json, "--out", jax_dir, "--seed", 4, "--force")
    assert not np.array_equal(layout.load_jax(jax_dir, TINY)["blocks/q/kernel"], flat["blocks/q/kernel"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jax", "torch"]


def test_init_overrides(tmp_path, monkeypatch):
    # The JAX init is stubbed with random arrays of the right shapes and dtype (no compile).
    pytest.importorskip("orbax.checkpoint")
    from tests.test_checkpoint import random_params
    from vitctl import init

    monkeypatch.setattr(init, "_jax_init", lambda cfg, seed: random_params(cfg, seed))
    invoke("init", "vit22b-mu/16", "--out", tmp_path / "o", "--num-classes", 7, "--image-size", 32, "--param-dtype", "bfloat16")
    cfg = layout.read_checkpoint_config(tmp_path / "o")
    assert cfg == dataclasses.replace(PRESETS["vit22b-mu/16"], num_classes=7, image_size=32, param_dtype="bfloat16")
    assert layout.load_jax(tmp_path / "o", cfg)["head/kernel"].dtype.name == "bfloat16"


def test_init_torch_without_jax(tmp_path, tiny_json):
    # With jax missing, --backend torch falls back to torch's own init, and says so.
    pytest.importorskip("torch")
    code = "import sys; sys.modules['jax'] = None\nfrom vitctl.cli import main; main(sys.argv[1:])\n"
    args = ["init", "--config", tiny_json, "--out", tmp_path / "o", "--backend", "torch", "--json"]
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["init"] == "torch" and "torch's own initialisation" in p.stderr
    assert layout.read_provenance(tmp_path / "o")["init"] == "torch"
    layout.load_torch(tmp_path / "o", TINY)  # names and shapes match the config
    p = subprocess.run(
        [sys.executable, "-c", code, "init", "--config", str(tiny_json), "--out", str(tmp_path / "j")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert_error(p, 1, "--backend jax needs jax")


def test_init_refuses_existing_dir_exit_2(tmp_path, cli):
    (tmp_path / "o").mkdir()
    p = cli("init", "vit22b-mu/16", "--out", tmp_path / "o")
    assert_error(p, 2, "already exists")
    assert "--force" in p.stderr


@pytest.mark.parametrize("exc, says", [("RecursionError", "nests too deeply"), ("MemoryError", "out of memory")])
def test_recursion_and_memory_errors_are_not_called_bugs(tmp_path, exc, says):
    # A backstop: the readers refuse deep or huge input themselves, naming the file.
    code = (
        "import sys; import vitctl.cli.models as m\n"
        f"def boom(spec): raise {exc}()\n"
        "m.resolve = boom\n"
        "from vitctl.cli import main; main(sys.argv[1:])\n"
    )
    p = subprocess.run([sys.executable, "-c", code, "info", "whatever"], capture_output=True, text=True, check=False)
    assert_error(p, 1, says)
    assert "bug in vitctl" not in p.stderr


def test_verify_bars_are_checked_before_any_work(cli):
    for flag in (["--tolerance", "-1"], ["--tolerance", "nan"], ["--rtol", "-0.5"]):
        assert_error(cli("verify", "no/such/a", "no/such/b", *flag), 2, f"{flag[0]} must be a finite number >= 0")
