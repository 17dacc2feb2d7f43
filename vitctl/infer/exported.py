"""Exported graphs (vitctl export) as a side of `vitctl verify`: detected, opened safely, run.

Detection is by content, never by name alone: a zip archive whose `archive_format` member says
"pt2" is a torch.export program; a file that parses as an ONNX ModelProto with a graph is an ONNX
model. A name ending in .onnx or .pt2 that is neither is refused with what was found.

Safety:
- ONNX runs in onnxruntime's CPU provider, with no custom-op library registered. Initializers
  stored outside the file (external data) are refused: a graph from elsewhere could point them
  at any file on this machine, and vitctl's exports are one file.
- torch.export.load unpickles: weights and constants marked `use_pickle` go through
  torch.load(weights_only=False), custom and opaque objects through pickle, and the sample
  inputs through torch.load(weights_only=True) with a fallback to weights_only=False
  (torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py). So before it is
  called, the archive must hold only the members torch.export.save writes for one plain
  program (raw tensor bytes, JSON, the sample inputs, extra files), no payload marked
  `use_pickle`, no custom or opaque objects, no legacy pickled weights, and sample inputs that
  torch.load(weights_only=True) reads (then torch's fallback is never reached). Anything else
  is refused, never loaded.

The graph has no preprocessing: verify feeds it the same seeded images as the other side,
prepared on the host (data.preprocess.prepare) per the graph's metadata (else the other
side's config), NCHW float32. Only the outputs the graph has are compared (logits, pre_logits).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitctl.config import ViTConfig
from vitctl.errors import CheckpointError, ConfigError, MissingDependencyError, VitctlError
from vitctl.infer.export import EXTRA_FILE, METADATA_KEY

ONNX, PT2 = "onnx", "torch-export"
RUNS_ON = {ONNX: "onnxruntime", PT2: "torch.export"}
# What torch.export.save writes for one program named "model" (below the archive's root folder).
PT2_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+|data/constants/model_constants_config\.json"
    r"|data/constants/tensor_\d+|data/sample_inputs/model\.pt|extra/[\w.-]+"
)
MAX_METADATA = 1 << 20  # bytes of metadata JSON read from a graph


def graph_format(path: str | Path, label: str = "file") -> str | None:
    """onnx or torch-export when `path` is an exported graph (by content), None for anything else.

    A file named *.onnx or *.pt2 that is not one is an error: it was meant as a graph."""
    path = Path(path)
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            fmt = next((PT2 for n in z.namelist() if n.endswith("/archive_format") and z.read(n)[:8] == b"pt2"), None)
    else:
        fmt = ONNX if _onnx_model(path) is not None else None
    if fmt is None and path.suffix.lower() in (".onnx", ".pt2"):
        want = "an ONNX model" if path.suffix.lower() == ".onnx" else "a torch.export archive (torch.export.save)"
        raise CheckpointError(f"{label}: {path} is not {want}: its content does not parse as one",
                              hint="export it again with `vitctl export`")  # fmt: skip
    return fmt


def _onnx_model(path: Path):
    """The ModelProto (external data not loaded), or None when the file is no ONNX model."""
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":  # field 1 (ir_version, a varint) comes first in a serialised ModelProto
            return None
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError(f"reading ONNX files needs onnx ({e})", hint="pip install 'vitctl[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  a protobuf DecodeError, or bytes that are not a ModelProto at all
        return None
    return model if model.ir_version > 0 and len(model.graph.node) > 0 else None


@dataclasses.dataclass
class Graph:
    """An exported graph, opened: its format, metadata (vitctl's, {} for a foreign graph) and model config."""

    label: str
    path: Path
    format: str
    meta: dict[str, Any]
    cfg: ViTConfig | None
    run: Callable[[np.ndarray], dict[str, np.ndarray]]  # float32 [B, C, S, S] -> {output name: float32 array}

    @property
    def backend(self) -> str:
        return RUNS_ON[self.format]


def open_graph(path: str | Path, label: str, fmt: str) -> Graph:
    """Opens an exported graph (after the safety checks above) ready to run."""
    path = Path(path)
    try:
        meta, run = _open_onnx(path, label) if fmt == ONNX else _open_pt2(path, label)
    except VitctlError:
        raise
    except Exception as e:  # noqa: BLE001  the runtime's own refusal of a damaged graph
        raise CheckpointError(f"{label}: {path}: {RUNS_ON[fmt]} cannot load it: {str(e)[:300]}",
                              hint="export it again with `vitctl export`") from None  # fmt: skip
    cfg = None
    if isinstance(meta.get("config"), dict):
        try:
            cfg = ViTConfig.from_dict(meta["config"])
        except (ConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{label}: {path}: the model config in its metadata is unusable: {e}") from None
    return Graph(label, path, fmt, meta, cfg, run)


def _parse_meta(text: str | bytes | None, label: str, path: Path) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > MAX_METADATA:
        raise CheckpointError(f"{label}: {path}: its vitctl metadata is over {MAX_METADATA} bytes")
    try:
        meta = json.loads(text)
    except ValueError:
        raise CheckpointError(f"{label}: {path}: its vitctl metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{label}: {path}: its vitctl metadata is not a JSON object")
    return meta


def _open_onnx(path: Path, label: str) -> tuple[dict[str, Any], Callable]:
    from onnx.external_data_helper import uses_external_data

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(f"running ONNX graphs needs onnxruntime ({e})", hint="pip install 'vitctl[export]'") from None
    model = _onnx_model(path)
    if model is None:
        raise CheckpointError(f"{label}: {path} is not an ONNX model")
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise CheckpointError(f"{label}: {path}: its weights live in external files, which vitctl does not follow",
                              hint="export a single-file ONNX model (vitctl export writes one)")  # fmt: skip
    meta = _parse_meta(next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None), label, path)
    del model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, names = session.get_inputs(), [o.name for o in session.get_outputs()]
    if len(inputs) != 1:
        raise CheckpointError(f"{label}: {path}: the graph takes {len(inputs)} inputs, not one batch of images")

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return {n: np.asarray(y, np.float32) for n, y in zip(names, session.run(names, {inputs[0].name: x}))}

    return meta, run


def check_pt2(path: Path, label: str) -> None:
    """Refuses a .pt2 archive that torch.export.load would unpickle anything from (see the module docstring)."""
    import torch

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{label}: {path}: {why}; vitctl loads only plain torch.export programs, which unpickle nothing",
                               hint="export it again with `vitctl export --format torch-export`")  # fmt: skip

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise refuse("its members are not under one root folder")
        root = roots.pop() + "/"
        odd = [n for n in names if not PT2_MEMBERS.fullmatch(n.removeprefix(root))]
        if odd:
            raise refuse(f"it holds members torch.export.save does not write for one program: {', '.join(odd[:5])}")
        for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
            config = root + f"data/{kind}/model_{kind}_config.json"
            entries = json.loads(z.read(config)).get("config", {}) if config in names else {}
            for fqn, entry in entries.items():
                if (
                    not isinstance(entry, dict)
                    or entry.get("use_pickle") is not False
                    or not str(entry.get("path_name")).startswith(prefix)
                ):
                    raise refuse(f"{kind} entry {fqn!r} is pickled or not a plain tensor")
        sample = root + "data/sample_inputs/model.pt"
        if sample in names:
            try:
                torch.load(io.BytesIO(z.read(sample)), weights_only=True)
            except Exception:  # noqa: BLE001  (torch's weights-only unpickler raises several types)
                raise refuse("its sample inputs need full unpickling (torch.load weights_only=True refuses them)") from None


def _open_pt2(path: Path, label: str) -> tuple[dict[str, Any], Callable]:
    import torch

    check_pt2(path, label)
    extra = {EXTRA_FILE: ""}
    module = torch.export.load(str(path), extra_files=extra).module()
    meta = _parse_meta(extra[EXTRA_FILE], label, path)
    names = meta.get("outputs") if isinstance(meta.get("outputs"), list) else None

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            ys = module(torch.from_numpy(x))
        ys = list(ys) if isinstance(ys, (tuple, list)) else [ys]
        keys = names if names and len(names) == len(ys) else ["logits", "pre_logits"][: len(ys)] if len(ys) <= 2 else []
        if not keys:
            raise CheckpointError(f"{label}: {path}: the program returns {len(ys)} outputs and no metadata names them")
        return {k: y.float().numpy() for k, y in zip(keys, ys)}

    return meta, run


# verify with an exported graph as one side (or both).
def open_any(path: str | Path, label: str):
    """An exported graph (Graph) or a checkpoint (vitctl.verify.Side), by content."""
    from vitctl.verify import open_side

    fmt = graph_format(path, label)
    return open_graph(path, label, fmt) if fmt else open_side(path, label)


def run_any(side, cfg: ViTConfig, precision: str, images: list[np.ndarray], want: set[str]) -> dict[str, np.ndarray]:
    """The outputs in `want` (logits, pre_logits) of a checkpoint, or every output of a graph, on `images`.

    A graph's input is prepared on the host from `cfg` (the graph's own, else the other side's)."""
    from vitctl.data import preprocess
    from vitctl.verify import run_config, run_side

    if isinstance(side, Graph):
        x = np.concatenate([preprocess.prepare(im[None], cfg) for im in images]).transpose(0, 3, 1, 2)
        try:
            return side.run(np.ascontiguousarray(x, np.float32))
        except VitctlError:
            raise
        except Exception as e:  # noqa: BLE001  the runtime refusing the input: wrong shape, channels or dtype for this graph
            raise CheckpointError(f"{side.label}: {side.path}: {side.backend} cannot run it on {list(x.shape)} images: {str(e)[:300]}",
                                  hint="the graph's input must be [batch, C, S, S] float32 images of the other side's model") from None  # fmt: skip
    out = run_side(side, run_config(side.cfg, precision), side.params(), images)
    return {k: v for k, v in out.items() if k in want}


def _describe(side) -> dict[str, Any]:
    d = {"path": str(side.path), "format": side.format, "backend": side.backend}
    if isinstance(side, Graph):
        d["metadata"] = {k: side.meta.get(k) for k in ("vitctl_version", "dtype", "source", "source_format", "outputs")}
    return d


def verify_graph(
    a: str | Path, b: str | Path, *, tolerance: float | None = None, rtol: float | None = None, rel_tol: float | None = None,
    batch: int = 4, seed: int = 0, images: str | Path | None = None, precision: str = "fp32",
) -> dict[str, Any]:  # fmt: skip
    """vitctl.verify.verify where A or B (or both) is an exported graph: the outputs the graph has
    (logits, pre_logits) on the same inputs, judged by the same bars; the report has verify's keys."""
    import time

    import vitctl
    from vitctl.data import preprocess
    from vitctl.verify import PRESETS, Tolerance, compare_outputs, config_diff, criterion, hint, roundoff, set_precision

    if precision not in PRESETS:
        raise ConfigError(f"unknown --precision '{precision}'", hint="choose fp32 or bf16")
    t0 = time.perf_counter()
    given = {"--tolerance": tolerance, "--rtol": rtol, "--rel-tol": rel_tol}
    tol = Tolerance(*(p if v is None else v for p, v in zip(dataclasses.astuple(PRESETS[precision]), given.values())))
    settings = set_precision(precision)
    side_a, side_b = open_any(a, "A"), open_any(b, "B")
    cfg = side_a.cfg or side_b.cfg
    if cfg is None:
        raise ConfigError("neither graph carries vitctl metadata: the input size and preprocessing are unknown",
                          hint="verify a graph against the checkpoint it was exported from")  # fmt: skip
    names, files = preprocess.load_image_files(images, channels=cfg.channels) if images is not None else ([], [])
    inputs = preprocess.random_images(batch, cfg.image_size, cfg.channels, seed) + files
    report: dict[str, Any] = {
        "a": _describe(side_a), "b": _describe(side_b), "tolerance": tol.atol, "rtol": tol.rtol, "rel_tol": tol.rel,
        "criterion": criterion(tol), "settings": {**settings, "vitctl": vitctl.__version__},
        "config_diff": config_diff(side_a.cfg, side_b.cfg) if side_a.cfg and side_b.cfg else [],
        "inputs": {"seeded": batch, "seed": seed, "image_files": names}, "weights": None,
    }  # fmt: skip
    out_a = run_any(side_a, side_a.cfg or cfg, precision, inputs, {"logits", "pre_logits"})
    out_b = run_any(side_b, side_b.cfg or cfg, precision, inputs, set(out_a))
    have = f"A: {', '.join(out_a) or 'none'}; B: {', '.join(out_b) or 'none'}"
    out_a = {k: v for k, v in out_a.items() if k in out_b}  # a graph has only the outputs it has
    result = compare_outputs(out_a, out_b, tol)
    report.update(result)
    problems = [] if result["layers"] else [f"no output in common ({have})"]
    problems += [f"outputs differ in shape: {', '.join(result['unmatched_layers'])}"] if result["unmatched_layers"] else []
    report.update(passed=result["first_divergent"] is None and not problems, problems=problems)
    if precision == "bf16" or "bfloat16" in {getattr(s, "meta", {}).get("dtype") for s in (side_a, side_b)}:
        report["roundoff"] = roundoff(result)
    if not report["passed"] and report.get("roundoff", {}).get("consistent"):
        report["hint"] = hint(report, precision, [(f, v) for f, v in given.items() if v is not None])
    elif not report["passed"]:
        where = "b" if isinstance(side_b, Graph) else "a"
        report["hint"] = (
            f"the graph does not compute the checkpoint's function: check which checkpoint it came from ({where}.metadata.source), "
        )
        report["hint"] += "or export it again with `vitctl export`"
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report
