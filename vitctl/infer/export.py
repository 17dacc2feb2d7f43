"""vitctl export: a checkpoint as a graph that runs with no vitctl and no model code.

- onnx: an ONNX model for onnxruntime, from torch.onnx.export's torch.export-based exporter
  (dynamo=True, onnxscript; the TorchScript exporter is deprecated). One file: models past
  protobuf's 2 GiB limit are refused (torch-export takes them).
- torch-export: torch.export's ExportedProgram saved by torch.export.save (.pt2, a zip archive);
  torch.export.load(...).module() runs it.

Both take one input, `images`: float32 [batch, C, S, S] (NCHW), already resized to S x S and
mapped per the config's preprocessing (value_range: lo + (hi - lo) * pixel / 255; mean/std:
(pixel / 255 - mean) / std). The batch dimension is dynamic. Outputs: `logits` [batch,
classes] and `pre_logits` [batch, D] (a model without pooling: [batch, T, D]), float32; a model
without a head (num_classes 0) has `pre_logits` alone.

The metadata (ONNX metadata_props; a .pt2's extra file `vitctl.json`) says all of that: the
input, the outputs, the preprocessing, class names, the model config, vitctl's version and the
source's format and public name (never a local path: vitctl.checkpoint.public_value).

dtype: float32, or bfloat16 for torch-export (weights and compute in bfloat16, norms and softmax
in float32, as the twin computes). onnxruntime's CPU provider has no bfloat16 MatMul or Add
kernels, so a bfloat16 ONNX graph would not run there: refused, with that reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import vitctl
from vitctl.config import ViTConfig
from vitctl.errors import ConfigError, MissingDependencyError
from vitctl.open import Checkpoint, open_checkpoint

FORMATS = ("onnx", "torch-export")
DTYPES = ("float32", "bfloat16")
METADATA_KEY = "vitctl"  # ONNX metadata_props key holding the metadata JSON
EXTRA_FILE = "vitctl.json"  # the same JSON in a .pt2 archive's extra files
ONNX_MAX_BYTES = 2**31 - 2**24  # protobuf's 2 GiB message limit, less room for the graph itself


def preprocess_text(cfg: ViTConfig) -> str:
    """How a uint8 image becomes the graph's input, in words."""
    p = cfg.preprocess
    resize = f"resize to {cfg.image_size}x{cfg.image_size} ({p.resize}{', antialias' if p.antialias else ''}, half-pixel centres)"
    if p.value_range is not None:
        lo, hi = p.value_range
        values = f"x = {lo:g} + {hi - lo:g} * pixel / 255"
    else:
        values = f"x = (pixel / 255 - mean) / std per channel, mean {list(p.mean)}, std {list(p.std)}"
    return f"{resize}; {values}; layout NCHW float32"


def metadata(ck: Checkpoint, fmt: str, dtype: str) -> dict[str, Any]:
    """What the exported file says about itself: JSON-ready, free of local paths."""
    from vitctl.checkpoint import public_provenance, public_value

    cfg = ck.cfg
    names = ck.provenance.get("class_names")
    ok = isinstance(names, list) and len(names) == cfg.num_classes and all(isinstance(n, str) for n in names)
    outputs = ["logits", "pre_logits"] if cfg.num_classes else ["pre_logits"]
    return {
        "vitctl_version": vitctl.__version__,
        "format": fmt,
        "dtype": dtype,
        "source": public_value(str(ck.path), path_key=True),
        "source_format": ck.format,
        "input": {"name": "images", "dtype": "float32", "layout": "NCHW", "shape": ["batch", cfg.channels, cfg.image_size, cfg.image_size]},
        "outputs": outputs,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "preprocess": dataclasses.asdict(cfg.preprocess),
        "preprocess_text": preprocess_text(cfg),
        "class_names": public_provenance(names) if ok else None,
        "config": cfg.to_dict(),
    }


def export_module(model, with_head: bool):
    """The twin wrapped to return plain float32 tensors: (logits, pre_logits), or pre_logits alone."""
    import torch

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):  # [B, C, S, S] float32
            logits, out = self.model(images)
            pre = out["pre_logits"].float()
            return (logits.float(), pre) if with_head else pre

    return Exported().eval()


def export(src: str | Path, dst: str | Path, *, fmt: str = "onnx", dtype: str = "float32", opset: int | None = None) -> dict[str, Any]:
    """Exports checkpoint `src` to the file `dst` (atomically; an existing `dst` is refused).

    Returns the report: the path, format, dtype, opset, size, input/outputs and metadata."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}'", hint=f"choose one of: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown --dtype '{dtype}'", hint="choose float32 or bfloat16")
    if fmt == "onnx" and dtype == "bfloat16":
        raise ConfigError(
            "--format onnx --dtype bfloat16: onnxruntime's CPU provider has no bfloat16 MatMul or Add kernels, so the graph would not run",
            hint="export bfloat16 with --format torch-export, or ONNX in float32",
        )
    if opset is not None and fmt != "onnx":
        raise ConfigError("--opset applies to --format onnx only")
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError(f"export needs torch ({e})", hint="pip install 'vitctl[torch]'") from None
    from vitctl.checkpoint import atomic_file
    from vitctl.infer.runner import torch_model

    t0 = time.perf_counter()
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():  # before the model is read; atomic_file checks again when it renames
        from vitctl.errors import OutputExistsError

        raise OutputExistsError(f"{dst} already exists", hint="remove it yourself, or choose another output path")
    with open_checkpoint(src, fetch="all") as ck:
        ck.check_memory("CKPT")
        meta = metadata(ck, fmt, dtype)
        cfg = dataclasses.replace(ck.cfg, dtype=dtype, param_dtype=dtype)
        if fmt == "onnx" and ck.nbytes > ONNX_MAX_BYTES:
            raise ConfigError(f"{ck.nbytes / 2**30:.1f} GiB of weights: past the 2 GiB an ONNX file can hold",
                              hint="use --format torch-export")  # fmt: skip
        model = torch_model(ck, cfg).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    module = export_module(model, bool(cfg.num_classes))
    example = torch.zeros(2, cfg.channels, cfg.image_size, cfg.image_size)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    with atomic_file(dst) as tmp:
        if fmt == "onnx":
            opset = _write_onnx(module, example, batch, meta, tmp, opset)
        else:
            _write_pt2(module, example, batch, meta, tmp)
    return {
        "path": str(dst), "format": fmt, "dtype": dtype, "opset": opset, "bytes": dst.stat().st_size,
        "input": meta["input"], "outputs": meta["outputs"], "preprocess": meta["preprocess_text"],
        "class_names": meta["class_names"] is not None, "source_format": meta["source_format"],
        "seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip


def _write_onnx(module, example, batch, meta: dict[str, Any], path: Path, opset: int | None) -> int:
    """torch.onnx.export (the torch.export-based exporter) into `path`; returns the opset written."""
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"--format onnx needs onnx and onnxscript ({e})", hint="pip install 'vitctl[export]'") from None
    outputs = meta["outputs"]
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines: stdout stays the report's
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=["images"], output_names=outputs, dynamic_shapes=({0: batch},),
            opset_version=opset, verbose=False,
        )  # fmt: skip
    model = program.model  # onnx_ir model: metadata goes in before it is serialised
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    for key in ("image_size", "preprocess_text", "class_names", "vitctl_version", "source_format"):
        model.metadata_props[key] = json.dumps(meta[key]) if not isinstance(meta[key], str) else meta[key]
    program.save(str(path), external_data=False)
    return model.opset_imports[""]


def _write_pt2(module, example, batch, meta: dict[str, Any], path: Path) -> None:
    import torch

    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    with open(path, "wb") as f:  # a file object: torch.export.save would append .pt2 to a name without it
        torch.export.save(program, f, extra_files={EXTRA_FILE: json.dumps(meta)})
