"""vitctl verify: do two checkpoints compute the same function? If not, where and why?

In order, each step exposing its own class of silent disagreement:
1. Configs: field-by-field differences (architecture and numerics).
2. Weights: both sides under one naming (per-layer JAX paths), compared tensor by
   tensor while one side streams: exactly-equal count and max-abs.
3. Activations: one seeded batch of uint8 images (plus `--images` files), through each
   side's own preprocessing and model; every named intermediate and the logits get
   max-abs, max-rel (max-abs diff over max-abs of A), mean-abs, rel_rms (||B-A|| / ||A||)
   and cosine; logits also top-1 / top-5 agreement. The sides run one after the other,
   so only one model is in memory at a time.
4. Verdict, by precision (PRESETS; any bar given explicitly is applied as well):
   fp32 forces jax_default_matmul_precision="highest" and TF32 off in torch, and holds
   logits and pre-logits to `tolerance` (max-abs), every other activation to `rtol` of
   its own scale. bf16 runs both models with bfloat16 compute and holds every activation
   to `rel_tol` of relative RMS error: bf16 round-off is relative to the values, so a
   max-abs bar fails large activations that are as close as bf16 allows.
   Where bf16 is involved (bf16 compute, or bfloat16 weights on a side) the report says
   whether the differences are consistent with bf16 round-off, and the hint says so.

`diagnose` re-runs side B with each known convention flipped (GELU, norm epsilon,
LayerNorm/RMSNorm, softmax dtype, QKV head layout) and names the flips that pass and at
least halve the error; differences consistent with bf16 round-off are called that, and
no flip is tried.

Sides: anything vitctl.open opens (a checkpoint directory, a big_vision .npz, hf://...).
vitctl-jax and big_vision .npz run the JAX model, vitctl-torch the PyTorch model, a timm
export timm's own model (timm.create_model from config.json).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import vitctl
from vitctl.config import ViTConfig
from vitctl.data import preprocess
from vitctl.errors import CheckpointError, ConfigError, VitctlError
from vitctl.open import BACKENDS, open_checkpoint
from vitctl.params import jax_param_shapes, rename, stack


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """A bar set to None is not applied."""

    atol: float | None  # max-abs on logits and pre-logits
    rtol: float | None  # max-abs diff / max-abs of A, every other activation
    rel: float | None = None  # rel_rms = ||B - A|| / ||A||, every activation (logits included)


# fp32: max-abs, as the field's parity tests do. bf16: both models compute
# in bfloat16 (norms and softmax in float32), and bfloat16 keeps 8 significant bits, so its
# round-off is relative to the values: a max-abs bar fails trained models whose activations
# are large (0.125 max-abs is two bf16 ulps at 10). The bf16 bar is the relative RMS error of
# each activation: round-off keeps it at a few ulps (2^-8 = 3.9e-3) at any scale, and the
# bar sits between that and the bugs bf16 can see (norm kind, head layout); GELU form and norm
# epsilon change bf16 outputs by less than round-off and need fp32. bench/verify_bf16.py
# measures both sides of the bar across sizes, random and trained weights.
BF16_REL = 5e-2
PRESETS = {"fp32": Tolerance(1e-5, 1e-5), "bf16": Tolerance(None, None, BF16_REL)}
HEAD_LAYERS = ("pre_logits", "logits")


# The two sides.
@dataclasses.dataclass
class Side:
    label: str  # "A" or "B"
    path: Path
    format: str  # vitctl-jax, vitctl-torch, big_vision, timm
    cfg: ViTConfig
    prefix: str | None = None

    @property
    def backend(self) -> str:
        return BACKENDS.get(self.format, "jax")

    def params(self) -> dict[str, np.ndarray]:
        """Per-layer JAX-named numpy parameters, read tensor by tensor."""
        return dict(self.iter_params())

    def iter_params(self) -> Iterator[tuple[str, np.ndarray]]:
        with open_checkpoint(self.path, fmt=self.format, model=self.cfg, prefix=self.prefix) as c:
            yield from c.iter_hub()


def open_side(path: str | Path, label: str, prefix: str | None = None) -> Side:
    """A checkpoint directory (vitctl-jax, vitctl-torch, timm export), a big_vision .npz or hf://...

    Its headers alone are read here: files outside the checkpoint, hostile names or metadata, a
    config that expects far more (or fewer) tensors than the weights hold, or weights past this
    machine's memory are refused before any data is read (and before a probe loads its data).
    Tensors missing or of the wrong shape are left to the comparison."""
    with open_checkpoint(path, prefix=prefix, label=label) as c:
        c.check_memory(label)  # the parameters are held whole, and copied once into a model
    return Side(label, c.path, c.format, c.cfg, prefix)


# Running a side.
def set_precision(precision: str) -> dict[str, Any]:
    """Pins matmul precision for `precision` and returns the effective settings."""
    settings: dict[str, Any] = {"precision": precision}
    try:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest" if precision == "fp32" else None)
        settings.update(
            jax=jax.__version__,
            jax_default_matmul_precision=jax.config.jax_default_matmul_precision or "default",
            jax_devices=[str(d) for d in jax.devices()[:1]],
        )
    except ImportError:
        pass
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
        settings.update(
            torch=torch.__version__, torch_allow_tf32=torch.backends.cuda.matmul.allow_tf32, torch_threads=torch.get_num_threads()
        )
    except ImportError:
        pass
    return settings


def run_side(side: Side, cfg: ViTConfig, params: dict[str, np.ndarray], images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Named intermediates (float32 numpy) of `side`'s model on `images` (uint8 HWC)."""
    if side.backend == "jax":
        from flax import nnx

        from vitctl.model_jax.model import abstract_model
        from vitctl.model_jax.state import load_flat_params

        model = abstract_model(cfg)
        load_flat_params(model, stack(params, cfg.depth))
        x = preprocess.to_jax_input(images, cfg.preprocess, cfg.image_size)
        _, out = nnx.jit(lambda m, x: m(x))(model, x)
        return {k: np.asarray(v, np.float32) for k, v in out.items()}
    import torch

    x = preprocess.to_torch_input(images, cfg.preprocess, cfg.image_size)
    state = {}
    for name, w in params.items():
        tname, layout = rename(name, "jax")
        state[tname] = layout.to_torch(w)
    if side.backend == "timm":
        return _run_timm(cfg, state, x)
    from vitctl.model_torch.model import abstract_model

    model = abstract_model(cfg)
    model.load_state_dict({k: _tensor(v) for k, v in state.items()}, strict=True, assign=True)
    with torch.inference_mode():
        _, out = model.eval()(x)
    return {k: v.float().numpy() for k, v in out.items()}


def _tensor(w: np.ndarray):
    """numpy -> torch without a copy where possible; ml_dtypes.bfloat16 travels as its bits.
    A read-only array (a view of a mapped checkpoint file) is copied: torch tensors are writable."""
    import torch

    w = np.ascontiguousarray(w) if w.flags.writeable else np.array(w, order="C")
    if w.dtype.name == "bfloat16":
        return torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(w)


def _run_timm(cfg: ViTConfig, state: dict[str, np.ndarray], x) -> dict[str, np.ndarray]:
    """timm's own model, built from the export's spec, with forward hooks for the intermediates."""
    import timm as timm_lib
    import torch

    from vitctl.convert import timm

    spec = timm.timm_spec(cfg)
    model = timm_lib.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).eval()
    model.load_state_dict({k: _tensor(v) for k, v in timm.to_timm_state_dict(state, cfg).items()}, strict=True)
    if cfg.dtype == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    out, hooks = {}, []
    named = [
        ("patch_embed", model.patch_embed),
        ("embed", model.norm_pre),  # after the position embedding and timm's norm_pre (an Identity without pre_norm), as vitctl's embed
        *((f"block{i:02d}", b) for i, b in enumerate(model.blocks)),
        ("encoded", model.norm),
    ]
    for name, module in named:
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o)))
    with torch.inference_mode():
        feats = model.forward_features(x)
        out["pre_logits"] = model.forward_head(feats, pre_logits=True)
        out["logits"] = model.forward_head(feats)
    for h in hooks:
        h.remove()
    return {k: v.float().numpy() for k, v in out.items()}


# Comparing.
def config_diff(a: ViTConfig, b: ViTConfig) -> list[dict[str, Any]]:
    da, db = a.to_dict(), b.to_dict()
    return [{"field": k, "a": da[k], "b": db[k]} for k in da if da[k] != db[k]]


def compare_weights(a: Side, b_params: dict[str, np.ndarray]) -> dict[str, Any]:
    """Streams A against B's parameters (both per-layer JAX names)."""
    compared = equal = 0
    worst, worst_name, mismatched = 0.0, None, []
    seen = set()
    for name, wa in a.iter_params():
        seen.add(name)
        wb = b_params.get(name)
        if wb is None or wa.shape != wb.shape:
            mismatched.append(name)
            continue
        compared += 1
        d = float(np.abs(wa.astype(np.float64) - wb.astype(np.float64)).max()) if wa.size else 0.0
        equal += d == 0.0 and wa.dtype == wb.dtype
        if d > worst or worst_name is None:
            worst, worst_name = d, name
    missing_in_a = sorted(set(b_params) - seen)
    return {
        "compared": compared, "exactly_equal": int(equal), "max_abs": worst, "max_abs_tensor": worst_name,
        "only_in_a": sorted(mismatched), "only_in_b": missing_in_a,
    }  # fmt: skip


def layer_stats(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    diff = np.abs(a64 - b64)
    scale = float(np.abs(a64).max()) or 1.0
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    return {
        "name": name, "max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale, "mean_abs": float(diff.mean()),
        "rel_rms": float(np.linalg.norm(diff)) / (na or 1.0), "cosine": float(a64 @ b64 / (na * nb)) if na * nb else 1.0,
    }  # fmt: skip


def topk_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """top1: share of samples with the same argmax; top5: mean overlap of the top-5 sets."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    k = min(5, a.shape[-1])
    ta, tb = np.argsort(-a, -1)[:, :k], np.argsort(-b, -1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])
    return {"top1": float(np.mean(ta[:, 0] == tb[:, 0])), "top5": float(overlap)}


def judge(layers: list[dict[str, Any]], tol: Tolerance) -> str | None:
    """Marks each layer passed/failed against every bar `tol` sets; returns the first
    divergent layer in forward order."""
    first = None
    for layer in layers:
        head = layer["name"] in HEAD_LAYERS
        bars = ((tol.atol if head else tol.rtol, layer["max_abs" if head else "max_rel"]), (tol.rel, layer["rel_rms"]))
        layer["passed"] = all(value <= limit for limit, value in bars if limit is not None)
        if not layer["passed"] and first is None:
            first = layer["name"]
    return first


def forward_rank(name: str) -> tuple[int, int]:
    """Sort key: intermediates in forward order (jax.jit returns dicts with sorted keys)."""
    order = {"patch_embed": 0, "embed": 1, "encoded": 3, "pre_logits": 4, "logits": 5}
    return (order[name], 0) if name in order else (2, int(name.removeprefix("block")))


def compare_outputs(out_a: dict, out_b: dict, tol: Tolerance) -> dict[str, Any]:
    names = sorted((k for k in out_a if k in out_b and out_a[k].shape == out_b[k].shape), key=forward_rank)
    layers = [layer_stats(k, out_a[k], out_b[k]) for k in names]
    first = judge(layers, tol)
    logits = next((x for x in layers if x["name"] == "logits"), None)
    result = {
        "layers": layers, "first_divergent": first, "max_abs": logits["max_abs"] if logits else None,
        "unmatched_layers": sorted(set(out_a) ^ set(names) | set(out_b) - set(names)),
    }  # fmt: skip
    if layers:
        worst = max(layers, key=lambda x: x["rel_rms"])
        result.update(rel_rms=worst["rel_rms"], rel_rms_layer=worst["name"], min_cosine=min(x["cosine"] for x in layers))
    if logits is not None:
        result.update(topk_agreement(out_a["logits"], out_b["logits"]))
    return result


def roundoff(result: dict[str, Any]) -> dict[str, Any]:
    """Whether the differences look like bf16 round-off: every activation within the bf16
    bar of relative RMS error (the bar sits between round-off and real bugs, see PRESETS)."""
    ok = result.get("rel_rms") is not None and result["rel_rms"] <= BF16_REL and not result["unmatched_layers"]
    figures = ""
    if ok:
        figures = f"worst relative RMS error {result['rel_rms']:.2e} at {result['rel_rms_layer']}, within {BF16_REL:g}; "
        figures += f"lowest cosine {result['min_cosine']:.6f}" + (f"; top-1 agreement {result['top1']:.0%}" if "top1" in result else "")
    return {"consistent": ok, "bar": BF16_REL, "summary": figures}


def run_config(cfg: ViTConfig, precision: str) -> ViTConfig:
    return dataclasses.replace(cfg, dtype="bfloat16" if precision == "bf16" else "float32")


# Diagnosis: each known convention flipped on side B.
MATERIAL = 0.5  # a flip is named only if it at least halves the error (see diagnose)


def _flip_qkv(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Undoes the classic head-layout bug in q/k/v kernels: a converter that read the
    (D, N*K) projection as (D, K, N) and transposed it to (D, N, K)."""
    out = dict(params)
    for name, w in params.items():
        if name.endswith(("/q/kernel", "/k/kernel", "/v/kernel")):
            D, N, K = w.shape
            out[name] = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(D, N, K)
    return out


def flips(cfg: ViTConfig, precision: str) -> list[tuple[str, ViTConfig, Callable | None]]:
    """(what, flipped config, parameter transform) for every known convention."""
    r = dataclasses.replace
    out = [
        (f"GELU {'exact (erf)' if cfg.gelu_approximate else 'tanh approximation'}", r(cfg, gelu_approximate=not cfg.gelu_approximate), None)
    ]
    out += [(f"norm epsilon {eps:g}", r(cfg, norm_eps=eps), None) for eps in (1e-5, 1e-6, 1e-12) if eps != cfg.norm_eps]
    other = {"layernorm": "rmsnorm", "rmsnorm": "layernorm"}[cfg.norm]
    norm_cfg = r(cfg, norm=other, norm_bias=cfg.norm_bias and other == "layernorm")
    keep = set(jax_param_shapes(norm_cfg, stacked=False))  # RMSNorm has no bias: drop the norms' biases
    drop_bias = (lambda p: {k: v for k, v in p.items() if k in keep}) if cfg.norm_bias != norm_cfg.norm_bias else None
    out.append((f"{'LayerNorm' if other == 'layernorm' else 'RMSNorm'} instead of {cfg.norm}", norm_cfg, drop_bias))
    if precision == "bf16":  # in fp32 the softmax dtype is fp32 either way
        out.append(
            (
                f"softmax in {'bf16' if cfg.softmax_dtype == 'float32' else 'float32'}",
                r(cfg, softmax_dtype="compute" if cfg.softmax_dtype == "float32" else "float32"),
                None,
            )
        )
    out.append(("QKV kernels with heads and head_dim transposed", cfg, _flip_qkv))
    return out


def diagnose(b: Side, b_params: dict, images: list, out_a: dict, tol: Tolerance, precision: str, base: dict) -> list[dict[str, Any]]:
    """Each flip on B, judged by `tol`. `named`: it passes and cuts the worst relative RMS error
    of `base` (the unflipped comparison) at least by MATERIAL. A flip that is not the cause
    leaves the error at the bug's level (or moves it by round-off, when there is no bug); the
    cause brings it down to round-off, 6x lower or more across bench/verify_bf16.py's models."""
    results = []
    for what, cfg, transform in flips(b.cfg, precision):
        side = dataclasses.replace(b, format="vitctl-jax" if b.backend == "jax" else "vitctl-torch")
        try:
            out_b = run_side(side, run_config(cfg, precision), transform(b_params) if transform else b_params, images)
        except VitctlError as e:
            results.append({"flip": what, "passed": False, "named": False, "error": e.message})
            continue
        r = compare_outputs(out_a, out_b, tol)
        passed = r["first_divergent"] is None and not r["unmatched_layers"]
        ratio = r["rel_rms"] / base["rel_rms"] if base["rel_rms"] else 1.0
        results.append(
            {
                "flip": what,
                "passed": passed,
                "named": passed and ratio <= MATERIAL,
                "max_abs": r["max_abs"],
                "rel_rms": r["rel_rms"],
                "ratio": ratio,
            }
        )
    return results


def criterion(tol: Tolerance) -> str:
    bars = [f"max-abs <= {tol.atol:g} on logits and pre-logits"] if tol.atol is not None else []
    bars += [f"max-abs / max-abs of A <= {tol.rtol:g} on every other activation"] if tol.rtol is not None else []
    bars += [f"relative RMS error ||B-A||/||A|| <= {tol.rel:g} on every activation"] if tol.rel is not None else []
    return "; ".join(bars) or "no bar: every comparison passes"


def diagnosis_note(results: list[dict[str, Any]], precision: str) -> str:
    named = [d for d in results if d["named"]]
    if named:
        return "; ".join(f"with {d['flip']} on B the relative RMS error drops {1 / d['ratio']:.0f}x and the check passes" for d in named)
    note = "no single known convention explains the difference (none passes and at least halves the error)"
    return note + (
        "; GELU form and norm epsilon change bf16 outputs by less than round-off: check them in fp32" if precision == "bf16" else ""
    )


def hint(report: dict[str, Any], precision: str, given: list[str]) -> str:
    """The next thing to try when the check fails."""
    r = report.get("roundoff", {})
    if r.get("consistent") and precision == "bf16":
        bars = ", ".join(f"{flag} {value:g}" for flag, value in given)
        bars = f"the bar{'s' * (len(given) > 1)} set ({bars}) {'are' if len(given) > 1 else 'is'}" if given else "the bars are"
        scale = "; max-abs does not scale with the values" if any(f != "--rel-tol" for f, _ in given) else ""
        return (
            f"the differences are consistent with bf16 round-off ({r['summary']}); {bars} tighter than bf16 allows{scale}: "
            f"leave them out to judge by the bf16 preset, relative RMS error <= {PRESETS['bf16'].rel:g}"
        )
    if r.get("consistent"):
        return f"a side holds bfloat16 weights and the differences are consistent with their round-off ({r['summary']}): verify with --precision bf16"
    below = "; in bf16, GELU form and norm epsilon are below round-off: verify in fp32 to check them" if precision == "bf16" else ""
    return "--diagnose tries the usual conventions (GELU, epsilon, norm, layout) on B" + below


def verify(
    a: str | Path, b: str | Path, *, tolerance: float | None = None, rtol: float | None = None, batch: int = 4, seed: int = 0,
    images: str | Path | None = None, precision: str = "fp32", run_diagnose: bool = False, prefix_a: str | None = None,
    prefix_b: str | None = None, rel_tol: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The whole check of A against B (each a checkpoint directory, a big_vision .npz or hf://...);
    returns the report (see module docstring). Raises only for usage errors and unreadable headers."""
    if precision not in PRESETS:
        raise ConfigError(f"unknown --precision '{precision}'", hint="choose fp32 or bf16")
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    t0 = time.perf_counter()
    given = {"--tolerance": tolerance, "--rtol": rtol, "--rel-tol": rel_tol}
    tol = Tolerance(*(p if v is None else v for p, v in zip(dataclasses.astuple(PRESETS[precision]), given.values())))
    settings = set_precision(precision)
    side_a, side_b = open_side(a, "A", prefix_a), open_side(b, "B", prefix_b)
    report = _header(side_a, side_b, tol, settings)
    names, files = [], []
    if images is not None:
        names, files = preprocess.load_image_files(images, channels=side_a.cfg.channels)
    inputs = preprocess.random_images(batch, side_a.cfg.image_size, side_a.cfg.channels, seed) + files
    report["inputs"] = {"seeded": batch, "seed": seed, "image_files": names}
    try:
        b_params = side_b.params()
        report["weights"] = compare_weights(side_a, b_params)
        out_b = run_side(side_b, run_config(side_b.cfg, precision), b_params, inputs)
        out_a = run_side(side_a, run_config(side_a.cfg, precision), side_a.params(), inputs)
    except CheckpointError as e:  # missing or unexpected tensors, corrupt files: a failed check
        problem = e.message + (f" ({e.hint})" if e.hint else "")
        report.update(passed=False, problems=[problem], layers=[], first_divergent=None, max_abs=None)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return report
    result = compare_outputs(out_a, out_b, tol)
    bf16_weights = "bfloat16" in (side_a.cfg.param_dtype, side_b.cfg.param_dtype)
    _verdict(report, result, precision, [(f, v) for f, v in given.items() if v is not None], bf16_weights)
    if run_diagnose and not report["passed"] and not result["unmatched_layers"]:
        report.update(_diagnosis(report, side_b, b_params, inputs, out_a, tol, precision, result), hint=None)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _header(side_a: Side, side_b: Side, tol: Tolerance, settings: dict[str, Any]) -> dict[str, Any]:
    """What the report says before anything runs: the sides, the bars, the settings, the config differences."""
    report: dict[str, Any] = {
        "a": {"path": str(side_a.path), "format": side_a.format, "backend": side_a.backend},
        "b": {"path": str(side_b.path), "format": side_b.format, "backend": side_b.backend},
        "tolerance": tol.atol, "rtol": tol.rtol, "rel_tol": tol.rel, "criterion": criterion(tol),
        "settings": {**settings, "vitctl": vitctl.__version__},
        "config_diff": config_diff(side_a.cfg, side_b.cfg),
    }  # fmt: skip
    if side_b.backend == "timm" or side_a.backend == "timm":
        import timm as timm_lib

        report["settings"]["timm"] = timm_lib.__version__
    return report


def _verdict(report: dict[str, Any], result: dict[str, Any], precision: str, given: list[tuple[str, float]], bf16_weights: bool) -> None:
    """Adds the comparison, the problems, the verdict, the round-off judgement and the hint to `report`."""
    problems = []
    if report["weights"]["only_in_a"] or report["weights"]["only_in_b"]:
        problems.append("the checkpoints hold different tensors (see weights.only_in_a / only_in_b)")
    report.update(result)
    if result["unmatched_layers"]:
        problems.append(f"outputs differ in shape or name: {', '.join(result['unmatched_layers'])}")
    report["passed"] = result["first_divergent"] is None and not problems
    report["problems"] = problems
    if precision == "bf16" or bf16_weights:
        report["roundoff"] = roundoff(result)
    if not report["passed"]:
        report["hint"] = hint(report, precision, given)


def _diagnosis(
    report: dict[str, Any], side_b: Side, b_params: dict, inputs: list, out_a: dict, tol: Tolerance, precision: str, result: dict
) -> dict[str, Any]:
    """--diagnose: the flips on B and what they show; none where the differences are bf16 round-off."""
    if report.get("roundoff", {}).get("consistent"):
        note = f"differences are consistent with bf16 round-off: {report['roundoff']['summary']}; no convention is flipped"
        return {"diagnosis": [], "diagnosis_note": note}
    diagnosis = diagnose(side_b, b_params, inputs, out_a, tol, precision, result)
    return {"diagnosis": diagnosis, "diagnosis_note": diagnosis_note(diagnosis, precision)}
