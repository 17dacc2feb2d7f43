"""`vitctl export`: the ONNX and torch.export graphs compute the checkpoint's function (verify
passes them against the vitctl-jax source, logits within the fp32 bar, top-1 agreement 100%), at
any batch size, with onnxruntime and torch alone; their metadata says how to feed them and holds
no local path; bf16 torch-export is within the bf16 bar, bf16 ONNX is refused (onnxruntime's CPU
provider has no bf16 kernels); a graph with one weight changed fails verify; an existing DST,
unknown formats, and garbage or pickling graphs given to verify are clear errors.

One random tiny checkpoint (16 px, 10 classes, class names) is exported once per format.
"""

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.cli.conftest import cli  # noqa: F401  (the CLI fixture)
from tests.conftest import random_params, tiny

torch = pytest.importorskip("torch")
pytest.importorskip("jax")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NAMES = [f"class-{i}" for i in range(10)]
BFLOAT16 = 13  # ScalarType.BFLOAT16 in torch/_export/serde/schema.py


def jax_ckpt(path: Path, cfg, provenance: dict) -> Path:
    from vitctl import checkpoint as ckpt
    from vitctl.formats import layout

    path.mkdir()
    ckpt.write_config(path, cfg, provenance)
    layout.save_jax(path, random_params(cfg))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from vitctl.infer.export import export

    root = tmp_path_factory.mktemp("export")
    ck = jax_ckpt(root / "ckpt", tiny(), {"class_names": NAMES})
    headless = jax_ckpt(root / "headless", tiny(num_classes=0), {})
    files = {"ckpt": ck, "headless": headless, "root": root}
    for name, src, fmt, dtype in (
        ("onnx", ck, "onnx", "float32"),
        ("pt2", ck, "torch-export", "float32"),
        ("bf16", ck, "torch-export", "bfloat16"),
        ("headless_pt2", headless, "torch-export", "float32"),
    ):
        files[name] = root / f"{name}.{'onnx' if fmt == 'onnx' else 'pt2'}"
        files[name + "_report"] = export(src, files[name], fmt=fmt, dtype=dtype)
    return files


def test_onnx_passes_verify_against_the_source(made, cli):  # noqa: F811
    r = cli("verify", made["ckpt"], made["onnx"], "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] and report["b"]["format"] == "onnx" and report["b"]["backend"] == "onnxruntime"
    assert [x["name"] for x in report["layers"]] == ["pre_logits", "logits"]
    assert report["max_abs"] <= 1e-5 and report["top1"] == 1.0


def test_torch_export_passes_verify_both_ways(made):
    from vitctl.infer.exported import verify_graph

    for a, b in ((made["ckpt"], made["pt2"]), (made["pt2"], made["ckpt"])):
        report = verify_graph(a, b)
        assert report["passed"], report
        assert report["max_abs"] <= 1e-5 and report["top1"] == 1.0


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_dynamic_batch_with_the_runtime_alone(made, kind):
    """Batches of 1, 3 and 8 through onnxruntime / torch.export.load on one file: each image's
    logits are the same whatever batch it is in."""
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    if kind == "onnx":
        session = ort.InferenceSession(str(made["onnx"]), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["logits", "pre_logits"]
        run = lambda b: session.run(["logits"], {"images": b})[0]
    else:
        module = torch.export.load(str(made["pt2"])).module()
        run = lambda b: module(torch.from_numpy(b))[0].detach().numpy()
    full = run(x)
    assert full.shape == (8, 10)
    for n in (1, 3):
        np.testing.assert_allclose(run(x[:n]), full[:n], atol=1e-5, rtol=0)


def onnx_metadata(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props["vitctl"]) | {"_props": props}


def pt2_metadata(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(next(n for n in z.namelist() if n.endswith("/extra/vitctl.json"))))


def test_metadata_says_how_to_feed_the_graph_and_holds_no_local_path(made):
    for meta, fmt in ((onnx_metadata(made["onnx"]), "onnx"), (pt2_metadata(made["pt2"]), "torch-export")):
        assert meta["format"] == fmt and meta["source_format"] == "vitctl-jax" and meta["source"] == "ckpt"
        assert meta["input"] == {"name": "images", "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, 16, 16]}
        assert meta["outputs"] == ["logits", "pre_logits"] and meta["class_names"] == NAMES
        assert meta["image_size"] == 16 and meta["preprocess"]["value_range"] == [-1.0, 1.0]
        assert "x = -1 + 2 * pixel / 255" in meta["preprocess_text"]
    assert json.loads(onnx_metadata(made["onnx"])["_props"]["class_names"]) == NAMES  # readable without parsing vitctl's JSON
    for name in ("onnx", "pt2", "bf16", "headless_pt2"):
        assert str(made["root"]).encode() not in every_byte(made[name]), name


def every_byte(path: Path) -> bytes:
    """The file's bytes, and for a zip archive each member's bytes as well (members may be compressed)."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            data += b"".join(z.read(n) for n in z.namelist())
    return data


def test_bf16_torch_export_is_within_the_bf16_bar(made):
    from vitctl.infer.exported import verify_graph

    with zipfile.ZipFile(made["bf16"]) as z:
        config = json.loads(z.read(next(n for n in z.namelist() if n.endswith("model_weights_config.json"))))["config"]
    assert {e["tensor_meta"]["dtype"] for e in config.values()} == {BFLOAT16}
    report = verify_graph(made["ckpt"], made["bf16"], precision="bf16")
    assert report["passed"] and report["rel_rms"] <= 5e-2 and report["top1"] == 1.0
    fp32 = verify_graph(made["ckpt"], made["bf16"])  # judged in fp32, bf16 round-off is named as such
    assert not fp32["passed"] and fp32["roundoff"]["consistent"] and "--precision bf16" in fp32["hint"]


def test_bf16_onnx_is_refused_and_nothing_written(made, cli):  # noqa: F811
    dst = made["root"] / "refused.onnx"
    r = cli("export", made["ckpt"], dst, "--dtype", "bfloat16")
    assert r.returncode == 2 and "no bfloat16 MatMul" in r.stderr and "torch-export" in r.stderr
    assert not dst.exists()


def test_onnxruntime_cpu_has_no_bf16_matmul_or_add():
    """Why bf16 ONNX is refused: the installed onnxruntime's CPU provider cannot run a bfloat16 MatMul
    or Add. When this fails, onnxruntime has gained the kernels and the refusal should go."""
    from onnx import TensorProto, helper

    for op in ("MatMul", "Add"):
        x, y = (helper.make_tensor_value_info(n, TensorProto.BFLOAT16, [2, 2]) for n in ("x", "y"))
        out = helper.make_tensor_value_info("z", TensorProto.BFLOAT16, [2, 2])
        graph = helper.make_graph([helper.make_node(op, ["x", "y"], ["z"])], "g", [x, y], [out])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_model_without_a_head_exports_pre_logits(made):
    from vitctl.infer.exported import verify_graph

    assert made["headless_pt2_report"]["outputs"] == ["pre_logits"]
    report = verify_graph(made["headless"], made["headless_pt2"])
    assert report["passed"] and [x["name"] for x in report["layers"]] == ["pre_logits"]


def test_a_changed_weight_fails_verify(made, cli):  # noqa: F811
    model = onnx.load(str(made["onnx"]))
    w = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1e-2
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    bad = made["root"] / "perturbed.onnx"
    onnx.save(model, str(bad))
    r = cli("verify", made["ckpt"], bad, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and not report["passed"] and report["max_abs"] > 1e-5
    assert "export it again" in report["hint"]


def test_existing_dst_and_unknown_format_are_refused(made, cli, tmp_path):  # noqa: F811
    dst = tmp_path / "vit.onnx"
    dst.write_text("mine")
    r = cli("export", made["ckpt"], dst)
    assert r.returncode == 2 and "already exists" in r.stderr and dst.read_text() == "mine"
    r = cli("export", made["ckpt"], tmp_path / "vit.tflite", "--format", "tflite")
    assert r.returncode == 2 and "tflite" in r.stderr
    r = cli("export", made["ckpt"], tmp_path / "vit.pt2", "--format", "torch-export", "--opset", "17")
    assert r.returncode == 2 and "--opset applies to --format onnx only" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]


def test_garbage_graphs_given_to_verify_are_clear_errors(made, cli, tmp_path):  # noqa: F811
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07not a model at all" * 10)
    (tmp_path / "garbage.pt2").write_bytes(np.random.default_rng(0).bytes(1000))
    with zipfile.ZipFile(tmp_path / "other.pt2", "w") as z:
        z.writestr("weights.npy", b"zip, but no torch.export archive")
    for name, said in (("garbage.onnx", "is not an ONNX model"), ("garbage.pt2", "is not a torch.export archive"), ("other.pt2", "not a")):
        r = cli("verify", made["ckpt"], tmp_path / name)
        assert r.returncode == 1 and said in r.stderr and "vitctl export" in r.stderr, (name, r.stderr)


def test_npz_is_not_taken_for_a_graph(tmp_path):
    from vitctl.infer.exported import graph_format

    np.savez(tmp_path / "bv.npz", a=np.zeros(3))
    assert graph_format(tmp_path / "bv.npz") is None and graph_format(tmp_path) is None


def tampered(src: Path, dst: Path, edit) -> Path:
    """A copy of the .pt2 archive `src` with `edit(name, bytes) -> bytes | None` applied to each member (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)
    return dst


def test_pt2_archives_that_would_unpickle_are_refused_before_loading(made, tmp_path):
    """torch.export.load unpickles payloads marked use_pickle, opaque objects and odd sample inputs:
    such archives are refused by their listing and configs, never handed to it."""
    from vitctl.errors import CheckpointError
    from vitctl.infer.exported import check_pt2

    def pickled(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    root = zipfile.ZipFile(made["pt2"]).namelist()[0].split("/")[0]
    cases = {
        "use_pickle": tampered(made["pt2"], tmp_path / "a.pt2", pickled),
        "members torch.export.save does not write": tampered(made["pt2"], tmp_path / "b.pt2", lambda n, d: d),
        "sample inputs": tampered(
            made["pt2"], tmp_path / "c.pt2", lambda n, d: _pickle_payload() if n.endswith("sample_inputs/model.pt") else d
        ),
    }
    with zipfile.ZipFile(cases["members torch.export.save does not write"], "a") as z:
        z.writestr(f"{root}/data/constants/custom_obj_0", b"\x80\x04N.")
    check_pt2(made["pt2"], "B")  # the real export passes
    for said, path in cases.items():
        with pytest.raises(CheckpointError) as e:
            check_pt2(path, "B")
        assert ("pickled" if said == "use_pickle" else said) in e.value.message, e.value.message


def _pickle_payload() -> bytes:
    """A torch.save'd object that only full unpickling reads (a class outside the weights-only allow list)."""
    import io

    buf = io.BytesIO()
    torch.save({"x": shutil.copyfileobj}, buf)
    return buf.getvalue()


def test_export_benchmark_script_runs(tmp_path):
    """bench/export.py end to end at its tiny size: the export rows, and per batch onnxruntime and the
    torch.export program against vitctl-torch, each computing the same logits; the temporaries removed."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "bench" / "export.py"
    p = subprocess.run([sys.executable, str(script), "--tiny", "--json", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)["rows"]}
    assert rows["export tiny onnx"]["value"] > 0 and rows["export tiny torch-export"]["value"] > 0
    for b in (1, 4):
        base = f"forward tiny fp32 b{b} vitctl-torch"
        for impl in ("onnxruntime", "torch.export"):
            row = rows[f"forward tiny fp32 b{b} {impl}"]
            assert row["baseline"] == base and row["ratio"] > 0
            assert float(row["note"].rsplit(" ", 1)[1]) <= 1e-5  # logits max-abs against the twin
    assert not any(tmp_path.iterdir())


def test_cli_json_is_one_object_and_headless_onnx_runs(made, cli, tmp_path):  # noqa: F811
    """--json: stdout holds the report alone (the exporter's progress goes to stderr); a model without
    a head gives its pre-logits [batch, D] as the ONNX graph's one output."""
    r = cli("export", made["headless"], tmp_path / "h.onnx", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["outputs"] == ["pre_logits"] and report["format"] == "onnx" and report["opset"] >= 18
    session = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"images": np.zeros((3, 3, 16, 16), np.float32)})
    assert y.shape == (3, 48)


def test_a_graph_is_not_exported_again(made, cli, tmp_path):  # noqa: F811
    r = cli("export", made["pt2"], tmp_path / "again.onnx")
    assert r.returncode == 2 and "is an exported graph, not a checkpoint" in r.stderr
    assert not any(tmp_path.iterdir())
