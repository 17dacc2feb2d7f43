"""What `vitctl hub push` publishes beside the weights: the model card (README.md) and the reports.

- `model_card`: YAML metadata that the Hub reads (library_name, license, pipeline_tag, tags,
  model-index with the accuracies), vitctl's own block (architecture, preprocessing, verify,
  probe, training, class names, provenance), then a Markdown body with loading snippets for
  the checkpoint's format: vitctl (CLI and Python) for vitctl-torch / vitctl-jax, and for a
  timm export the `timm.create_model("hf-hub:...")` / `("local-dir:...")` calls. Each snippet
  is run by tests/hub/test_card.py against the pushed repo.
- `find_verify_report` / `find_probe_report`: the `vitctl verify --report` and `vitctl probe`
  results for this checkpoint, in it or beside it (where `vitctl demo` writes them).
- `public_report`: a report as it may be uploaded, local paths reduced to names
  (checkpoint.public_provenance).

Metrics come from what vitctl itself measured: the verify report, the probe report, and the
training run's `test_accuracy` / `step` / `class_names` in config.json's provenance (or in the
provenance of the checkpoint it was converted or pulled from). Nothing is claimed that these
files do not hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import vitctl
from vitctl import checkpoint as ckpt_mod
from vitctl import untrusted
from vitctl.errors import CheckpointError
from vitctl.formats import layout
from vitctl.formats.layout import PARAMS

VERIFY_REPORT, PROBE_REPORT = "verify.json", "probe.json"
DEFAULT_LICENSE = "other"  # the weights' license is the owner's to state: the Hub shows "other" until they do
NESTED = ("source_provenance", "upstream")  # where a converted or pulled checkpoint keeps its source's provenance


def _own_report(ckpt: Path, name: str, sides: Any) -> dict[str, Any] | None:
    """ckpt/NAME, else the parent's NAME if `sides(report)` names this checkpoint (same path or name:
    `vitctl demo` writes its reports inside a temporary directory, then renames it)."""
    here = ckpt.resolve()
    for path in (ckpt / name, ckpt.parent / name):
        if path.parent == ckpt and path.exists():  # its own report is uploaded: it must be the checkpoint's file
            from vitctl.formats.base import hf_cache_repo

            untrusted.inside(ckpt, path, str(ckpt), also=hf_cache_repo(ckpt))
        try:
            report = untrusted.read_json(path)
        except CheckpointError:  # absent, or not a report (not JSON, too deep, too big): none
            continue
        if not isinstance(report, dict):
            continue
        found = [Path(p) for p in sides(report) if isinstance(p, str)]
        if path.parent == ckpt or any(s.resolve() == here or s.name == ckpt.name for s in found):
            return report
    return None


def find_verify_report(ckpt: Path) -> dict[str, Any] | None:
    """The latest `vitctl verify --report` for this checkpoint: ckpt/verify.json, else the parent's
    verify.json (where `vitctl demo` writes it) if one of its two sides is this checkpoint."""

    def sides(r: dict[str, Any]) -> list[Any]:
        return [(r.get(s) or {}).get("path") for s in ("a", "b") if isinstance(r.get(s), dict)] if "passed" in r else []

    report = _own_report(ckpt, VERIFY_REPORT, sides)
    return report if report is not None and "passed" in report else None


def find_probe_report(ckpt: Path) -> dict[str, Any] | None:
    """`vitctl probe --json` output for this checkpoint: ckpt/probe.json, else the parent's (as `vitctl demo` writes it)."""
    report = _own_report(
        ckpt, PROBE_REPORT, lambda r: [(r.get("checkpoint") or {}).get("path")] if isinstance(r.get("checkpoint"), dict) else []
    )
    return report if report is not None and ("linear" in report or "fewshot" in report) else None


def public_report(report: dict[str, Any]) -> dict[str, Any]:
    """A report with every local path reduced to its final name (the sides' paths, cache files)."""
    return ckpt_mod.public_provenance(report)


def lineage(provenance: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """This provenance, then its source's (converted: source_provenance; pulled: upstream), and so on."""
    seen = 0
    while isinstance(provenance, dict) and seen < 8:
        yield provenance
        provenance = next((provenance[k] for k in NESTED if isinstance(provenance.get(k), dict)), None)
        seen += 1


def training(provenance: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """What the training run recorded: data, step, test_accuracy, init_from (a fine-tuning run's source),
    class_names (first found along the lineage)."""
    found: dict[str, Any] = {}
    for p in lineage(provenance):
        if p.get("created_by") == "vitctl train" or "test_accuracy" in p:
            for k in ("data", "step", "test_accuracy"):
                found.setdefault(k, p.get(k))
            if isinstance(p.get("init_from"), dict):  # a fine-tuning run: the checkpoint it started from
                found.setdefault("init_from", {k: p["init_from"].get(k) for k in ("source", "revision", "format")})
        names = p.get("class_names")
        if "class_names" not in found and isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
            found["class_names"] = names
    acc = found.get("test_accuracy")
    if not isinstance(acc, (int, float)) or isinstance(acc, bool):
        found.pop("test_accuracy", None)
    return {k: v for k, v in found.items() if v is not None}


def _verify_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    keys = ("passed", "max_abs", "tolerance", "rtol", "rel_rms", "rel_tol", "criterion", "first_divergent")
    verify = {k: report.get(k) for k in keys}
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    verify.update(precision=settings.get("precision"), vitctl=settings.get("vitctl"))
    if isinstance(report.get("weights"), dict):
        verify["weights_exactly_equal"] = report["weights"].get("exactly_equal")
        verify["weights_compared"] = report["weights"].get("compared")
    return verify


def _probe_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    probe = {k: report.get(k) for k in ("data", "layer", "pool", "backend", "train_size", "test_size")}
    probe["data"] = ckpt_mod.public_value(str(probe["data"]), path_key=True) if probe["data"] is not None else None
    if isinstance(report.get("linear"), dict):
        probe["linear_accuracy"] = report["linear"].get("accuracy")
    if isinstance(report.get("fewshot"), dict):
        probe["fewshot_accuracy"] = {str(k): v.get("accuracy") for k, v in report["fewshot"].items() if isinstance(v, dict)}
    return probe


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def model_index(name: str, train: dict[str, Any], probe: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The Hub's `model-index` (what its evaluation widget shows): test accuracy of the training
    run, and the probe's linear and few-shot accuracies, each on the data set it was measured on."""
    task = {"type": "image-classification", "name": "Image Classification"}
    results = []
    if _number(train.get("test_accuracy")) and train.get("data"):
        data = str(train["data"])
        metric = {"type": "accuracy", "value": float(train["test_accuracy"]), "name": "test accuracy (vitctl train)"}
        results.append({"task": task, "dataset": {"name": data, "type": data, "split": "test"}, "metrics": [metric]})
    if probe and probe.get("data"):
        metrics = []
        if _number(probe.get("linear_accuracy")):
            metrics.append(
                {"type": "accuracy", "value": float(probe["linear_accuracy"]), "name": f"linear probe accuracy ({probe['layer']})"}
            )
        for k, v in (probe.get("fewshot_accuracy") or {}).items():
            if _number(v):
                metrics.append({"type": "accuracy", "value": float(v), "name": f"{k}-shot accuracy ({probe['layer']})"})
        if metrics:
            data = str(probe["data"])
            results.append({"task": task, "dataset": {"name": data, "type": data, "split": "test"}, "metrics": metrics})
    return [{"name": name, "results": results}] if results else None


def model_card(
    ckpt: Path, cfg: Any, repo_id: str, files: dict[str, Path], report: dict[str, Any] | None, license: str = DEFAULT_LICENSE,
    probe_report: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """README.md: YAML metadata and a Markdown body (see the module docstring)."""
    import yaml

    from vitctl.params import param_counts

    model = cfg.to_dict()
    pre = model.pop("preprocess")
    counts = param_counts(cfg)
    jax = any(p.startswith(PARAMS + "/") for p in files)
    timm = layout.TIMM in layout.detect_formats(ckpt)
    provenance = ckpt_mod.public_provenance(layout.read_provenance(ckpt))
    train = training(provenance, cfg.num_classes)
    verify, probe = _verify_summary(report), _probe_summary(probe_report)
    name = repo_id.split("/")[-1]
    tags = ["vitctl", "vision-transformer", "vit-22b", "image-classification", "safetensors", "pytorch"]
    tags += ["timm"] if timm else []
    tags += ["jax", "flax"] if jax else []
    meta: dict[str, Any] = {
        "library_name": "timm" if timm else "vitctl",
        "license": license,
        "pipeline_tag": "image-classification",
        "tags": tags,
    }
    if index := model_index(name, train, probe):
        meta["model-index"] = index
    meta["vitctl"] = {
        "version": vitctl.__version__,
        "format": layout.TIMM if timm else layout.TORCH if any(p.endswith(".safetensors") for p in files) else layout.JAX,
        "parameters": counts["params_total"],
        "architecture": model,
        "preprocessing": pre,
        "verify": verify,
        "probe": probe,
        "training": {k: v for k, v in train.items() if k != "class_names"} or None,
        "class_names": train.get("class_names"),
        "provenance": provenance,
    }
    # Written out in full, never as YAML anchors and aliases (&id001 / *id001), which not every card reader follows.
    dumper = type("Dumper", (yaml.SafeDumper,), {"ignore_aliases": lambda self, data: True})
    front = yaml.dump(meta, Dumper=dumper, sort_keys=False, default_flow_style=False)
    reports = [n for n, r in ((VERIFY_REPORT, report), (PROBE_REPORT, probe_report)) if r is not None]
    return f"---\n{front}---\n\n" + _body(name, repo_id, cfg, pre, counts, [*files, *reports], jax, timm, train, verify, probe, model)


def _body(name, repo_id, cfg, pre, counts, files, jax, timm, train, verify, probe, model) -> str:
    arch = "\n".join(f"| `{k}` | `{v}` |" for k, v in model.items())
    shown = [p for p in files if not p.startswith(PARAMS + "/")] + (
        [f"{PARAMS}/ ({sum(p.startswith(PARAMS + '/') for p in files)} files, Orbax)"] if jax else []
    )
    if pre.get("mean") is not None:
        norm = f"subtract mean {pre['mean']}, divide by std {pre['std']}"
    else:
        norm = f"scale pixel values to {pre.get('value_range')}"
    results = []
    if _number(train.get("test_accuracy")):
        at = f" after {train['step']} steps" if train.get("step") is not None else ""
        results.append(f"- Test accuracy of the training run on `{train.get('data', '?')}`{at}: **{train['test_accuracy']:.2%}**")
    if probe:
        if _number(probe.get("linear_accuracy")):
            results.append(f"- Linear probe on `{probe['data']}` ({probe['layer']} features): **{probe['linear_accuracy']:.2%}**")
        shots = ", ".join(f"{k}-shot {v:.2%}" for k, v in (probe.get("fewshot_accuracy") or {}).items() if _number(v))
        if shots:
            results.append(f"- Few-shot on `{probe['data']}`: {shots}")
    if verify is None:
        results.append("- No `vitctl verify` report came with this checkpoint.")
    else:
        status = "passed" if verify["passed"] else "FAILED"
        if verify["tolerance"] is None and verify["rel_tol"] is not None:  # bf16: judged by relative RMS error
            measure = f"worst relative RMS error {verify['rel_rms']} (bar {verify['rel_tol']}"
        else:
            measure = f"logits max-abs difference {verify['max_abs']} (tolerance {verify['tolerance']}"
        results.append(
            f"- `vitctl verify` {status}: {measure}, precision {verify['precision']}) between the JAX and PyTorch models; "
            "the full report is `verify.json`."
        )
    results[:0] = _init_line(train)
    classes = train.get("class_names")
    classes_md = f"\n\n## Classes\n\n{', '.join(f'`{c}`' for c in classes)} (logit index order)." if classes else ""
    return f"""# {name}

A ViT-22B-style Vision Transformer ({counts["params_total"]:,} parameters: width {cfg.width}, depth {cfg.depth},
MLP {cfg.mlp_dim}, {cfg.num_heads} heads, patch {cfg.patch_size}, {cfg.image_size} px, {cfg.block} block,
{cfg.pool} pooling, {cfg.num_classes} classes), saved by [vitctl](https://pypi.org/project/vitctl/) {vitctl.__version__}.
{_use(name, repo_id, timm)}
## Results

{chr(10).join(results)}{classes_md}

## Preprocessing

Resize to {cfg.image_size}x{cfg.image_size} ({pre.get("resize")}, antialias {pre.get("antialias")}), then {norm};
{cfg.channels} channels.

## Architecture

| option | value |
| --- | --- |
{arch}

## Files

{chr(10).join(f"- `{p}`" for p in shown)}
"""


def _init_line(train: dict[str, Any]) -> list[str]:
    """The checkpoint a fine-tuning run started from, as one Results line (none for a run from scratch)."""
    init = train.get("init_from")
    if not isinstance(init, dict) or not init.get("source"):
        return []
    revision = f" at revision `{init['revision']}`" if init.get("revision") else ""
    return [f"- Fine-tuned from `{init['source']}`{revision} ({init.get('format', '?')}) with `vitctl train --init-from`."]


def _use(name: str, repo_id: str, timm: bool) -> str:
    """The loading snippets for the format: each one runs as written (tests/hub/test_card.py)."""
    if timm:
        return f"""This is a timm export (`vitctl convert ... --format timm`): timm's own `VisionTransformer` loads it with
`strict=True` and computes the same function as vitctl's model.

## Use

```python
import timm

model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()
```

From a local copy (`vitctl hub pull {repo_id} --out {name}`, or any download of this repo):
`timm.create_model("local-dir:{name}", pretrained=True)`.
"""
    return f"""The JAX (Flax NNX) and PyTorch implementations load the same weights.

## Use

```bash
vitctl hub pull {repo_id} --out {name} --backend torch   # or jax, all; add @REVISION to pin
vitctl info hf://{repo_id}
```

```python
import numpy as np
import torch
from vitctl.formats import layout
from vitctl.model_torch.model import ViT

cfg = layout.read_checkpoint_config("{name}")
model = ViT(cfg).eval()
model.load_state_dict({{k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in layout.load_torch("{name}", cfg).items()}})
```
"""
