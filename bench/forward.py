"""Inference throughput of vitctl's two models at B/16 size, side by side with timm and
with each framework's GEMM peak measured in the same run.

    python bench/forward.py [--quick] [--json] [--extra] [--batch-size 8] [--bf16-batch-size N]

Compared, at 224 px, per dtype (fp32, bf16):
- classic B/16: vitctl `B/16` (sequential block, LayerNorm eps 1e-6, tanh GELU, QKV
  bias, class token) vs timm `vit_base_patch16_224` built from the same config by
  vitctl.convert.timm.timm_spec (so tanh GELU too: the same function);
- parallel B/16: vitctl `vit22b-B/16` with pool="tok" (parallel block, QK-norm,
  RMSNorm, no QKV bias, exact GELU, fused forward) vs timm `vit_base_patch16_xp_224`
  (ParallelScalingBlock, qk_norm, RmsNorm), built by timm_spec from the same config. pool="tok" because timm's model pools the
  class token: both then run T = 197 tokens and the same matmuls (the preset's MAP
  head would add a 197-token attention and an MLP);
- vitctl-jax on both configs: jax.jit of the forward (AOT-compiled before timing),
  `jax.block_until_ready` after each call, logits only returned;
- outside --quick, vitctl with fused=False on the parallel config (what the per-call
  weight concatenation of the fused forward costs).

bf16: vitctl-torch runs cfg dtype="bfloat16" with param_dtype="bfloat16"; timm runs
`model.to(torch.bfloat16)` with bf16 inputs (pure bf16, no autocast): the same thing.
vitctl-jax runs dtype="bfloat16" with fp32 params cast at use. --extra adds
vitctl-jax with param_dtype="bfloat16" and vitctl-torch with fp32 params cast at use.
Where torch has no native bf16 GEMM (no AVX512-BF16/AMX: a reference kernel, ~15
GFLOP/s, half a minute per batch of 8) the torch bf16 rows run at batch 1.

Images/s is batch / the best seconds per batch over the timed rounds (the median is
shown too): on a shared 2-core machine other processes only ever add time, and an
oversubscribed OpenMP or XLA thread pool can run several times slower, so the best
round is the better estimate of what the code costs. GFLOP/s uses the analytic count
of vitctl.bench.flops (2 x MACs of every matmul, attention included). "of
peak" divides by the best GEMM rate measured here for that framework and dtype. All
rows of one (config, dtype) are timed interleaved. Nothing asserts on time; on a
shared machine read the load line printed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

from vitctl import bench as C
from vitctl.config import ViTConfig

CONFIGS = {  # label -> (vitctl config, timm model name)
    "classic": (ViTConfig.from_variant("B/16"), "vit_base_patch16_224"),
    "parallel": (ViTConfig.from_variant("vit22b-B/16", pool="tok"), "vit_base_patch16_xp_224"),
}
DT_SHORT = C.DT_SHORT


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:5.0f} s] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Entry:
    """One timed model: a name, what to call, and its results."""

    name: str  # e.g. "vitctl-torch classic fp32"
    framework: str  # "torch" | "jax"
    config: str  # key of CONFIGS
    dtype: str  # "float32" | "bfloat16"
    batch: int
    call: object  # () -> None, synchronised
    cfg: ViTConfig
    baseline: str | None = None  # name of the timm entry it is compared with
    note: str = ""
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def img_s(self) -> float:  # best of the timed rounds: see the module docstring
        return self.batch / min(self.times)

    @property
    def median_img_s(self) -> float:
        return self.batch / statistics.median(self.times)

    @property
    def gflops(self) -> float:
        return C.flops(self.cfg) * self.img_s / 1e9


# ----------------------------------------------------------------------------- builders
def torch_vitctl(cfg: ViTConfig, batch: int):
    return C.torch_forward(C.vitctl_torch_model(cfg), cfg, batch, cfg.dtype)


def torch_timm(cfg: ViTConfig, dtype: str, batch: int):
    """timm's model of the same configuration (vitctl.convert.timm.timm_spec), pure `dtype`."""
    return C.torch_forward(C.timm_model(cfg, dtype), cfg, batch, dtype)


def probe_torch_cast_at_use(cfg: ViTConfig) -> str:
    """Does vitctl-torch run dtype=bf16 with fp32 params? Tried on a tiny model of the
    same kind (seconds, not minutes). Returns "" when it works, else the error."""
    import torch

    from vitctl.model_torch.model import ViT

    tiny = dataclasses.replace(cfg, width=32, depth=1, mlp_dim=64, num_heads=2, num_classes=10, dtype="bfloat16", param_dtype="float32")
    try:
        with torch.inference_mode():
            ViT(tiny).eval()(torch.randn(1, 3, cfg.image_size, cfg.image_size))
    except Exception as e:  # noqa: BLE001  (report, never crash the benchmark)
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return ""


# ----------------------------------------------------------------------------- options
def parse_args(argv=None) -> argparse.Namespace:
    """The options, with --warmup, --iters and --max-wait resolved to numbers (their
    defaults depend on --quick)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="one timed round, no warm-up round, no oneDNN GEMM probe or second GEMM pass, no fused=False rows",
    )
    p.add_argument(
        "--extra", action="store_true", help="also time vitctl-jax bf16 with param_dtype=bfloat16 and vitctl-torch bf16 with fp32 params"
    )
    p.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} on stdout, nothing else there')
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--bf16-batch-size", type=int, default=0,
        help="batch for the torch bf16 rows; 0 (default): --batch-size, or 1 when this CPU's torch bf16 GEMM "
        "runs below a quarter of its fp32 rate (no native bf16: a reference kernel, half a minute per batch of 8)",
    )  # fmt: skip
    p.add_argument(
        "--warmup", type=int, default=None,
        help="untimed rounds (default 1; --quick 0: jax is compiled ahead of time and the GEMM probes have already "
        "warmed MKL, oneDNN, XLA and the thread pools)",
    )  # fmt: skip
    p.add_argument(
        "--max-wait", type=float, default=None,
        help="seconds, over the whole run, to wait for other processes to leave the CPUs before timed calls "
        "(default 60, --quick 20; 0: never wait)",
    )  # fmt: skip
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 3, --quick 1)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.bf16_batch_size < 0:
        p.error("batch sizes must be positive")
    if (args.iters is not None and args.iters < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--iters must be at least 1 and --warmup at least 0")
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.iters is None:
        args.iters = 1 if args.quick else 3
    if args.max_wait is None:
        args.max_wait = 20.0 if args.quick else 60.0
    return args


def describe_settings(args: argparse.Namespace, cores: int) -> dict[str, str]:
    """The frameworks' threading and kernels, and the timing method: printed above the tables."""
    import jax
    import torch

    return {
        "cpu": C.cpu_description(),
        "torch": f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads (set_num_threads({cores})), "
        f"{torch.get_num_interop_threads()} inter-op, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, mkldnn {'on' if torch.backends.mkldnn.is_available() else 'off'}",
        "jax": f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, XLA CPU intra-op pool = all "
        f"{cores} cores (XLA default), XLA_FLAGS={os.environ.get('XLA_FLAGS', 'unset')}, default matmul precision (fp32 = full)",
        "method": f"batch {args.batch_size}, 224 px, {args.warmup} warm-up + {args.iters} timed rounds, rows of one (config, dtype) "
        "interleaved; images/s = batch / best round (median also shown); torch.inference_mode()",
    }


# ----------------------------------------------------------------------------- GEMM peaks
def measure_gemm(shapes, batch: int, quick: bool, gate) -> dict[str, dict]:
    """label -> {shape: GFLOP/s} of each framework's GEMM on the model's shapes."""
    cfg0 = CONFIGS["classic"][0]
    # bf16 may hit a reference kernel: the batch's MLP-in shape and the batch-1 one (the
    # torch bf16 rows fall back to batch 1 there) are enough.
    bf16_shapes = [shapes[0], (cfg0.seq_len, cfg0.width, cfg0.mlp_dim)] if batch > 1 else shapes[:1]
    gemm: dict[str, dict] = {}
    gate.wait()
    log("GEMM: torch fp32 (F.linear, MKL) ...")
    gemm["torch fp32 F.linear (MKL)"] = C.torch_gemm_gflops("float32", shapes)
    if not quick:
        log("GEMM: torch fp32 (oneDNN MkldnnLinear) ...")
        gemm["torch fp32 MkldnnLinear (oneDNN)"] = C.torch_mkldnn_gemm_gflops(shapes)
    log("GEMM: torch bf16 (F.linear) ...")
    gemm["torch bf16 F.linear"] = C.torch_gemm_gflops("bfloat16", bf16_shapes, min_time=0.0, max_reps=2)
    log("GEMM: XLA fp32 and bf16 (jit a @ b) ...")
    gemm["XLA fp32 jit(a @ b)"] = C.xla_gemm_gflops("float32", shapes)
    gemm["XLA bf16 jit(a @ b)"] = C.xla_gemm_gflops("bfloat16", shapes)
    return gemm


def measure_gemm_again(gemm: dict[str, dict], shapes, gate) -> None:
    """A second look at the peaks after the models, so one busy moment cannot set them."""
    gate.wait()
    log("GEMM: second pass (torch fp32, XLA fp32 and bf16; model shapes) ...")
    again = {
        "torch fp32 F.linear (MKL)": C.torch_gemm_gflops("float32", shapes),
        "torch fp32 MkldnnLinear (oneDNN)": C.torch_mkldnn_gemm_gflops(shapes),
        "XLA fp32 jit(a @ b)": C.xla_gemm_gflops("float32", shapes),
        "XLA bf16 jit(a @ b)": C.xla_gemm_gflops("bfloat16", shapes),
    }
    for label, rates in again.items():
        for shape, r in rates.items():
            gemm[label][shape] = max(gemm[label][shape], r)


def peak(gemm: dict[str, dict], framework: str, dtype: str) -> tuple[str, float]:
    """(label, GFLOP/s) of the best GEMM measured for a framework and dtype."""
    prefix = ("torch " if framework == "torch" else "XLA ") + DT_SHORT[dtype]
    label, rates = max(((k, v) for k, v in gemm.items() if k.startswith(prefix)), key=lambda kv: max(kv[1].values()))
    return label, max(rates.values())


# ----------------------------------------------------------------------------- models
def torch_entries(label: str, dtype: str, batch: int, args: argparse.Namespace, notes: list[str]) -> list[Entry]:
    """vitctl-torch and timm rows of one (config, dtype); a failed bf16 cast-at-use probe adds a note."""
    base_cfg, timm_name = CONFIGS[label]
    d = DT_SHORT[dtype]
    timm_entry = f"timm {label} {d}"
    log(f"build: {label} {d} ...")
    timm = Entry(timm_entry, "torch", label, dtype, batch, torch_timm(base_cfg, dtype, batch), base_cfg, note=timm_name)
    err = ""
    if dtype == "float32":
        cfg, tnote = base_cfg, ""
    else:
        cfg, tnote = dataclasses.replace(base_cfg, dtype=dtype, param_dtype=dtype), "param_dtype bf16"
        err = probe_torch_cast_at_use(base_cfg)
        if err:
            notes.append(f"vitctl-torch {label}: dtype=bfloat16 with fp32 params fails ({err})")
    group = [Entry(f"vitctl-torch {label} {d}", "torch", label, dtype, batch, torch_vitctl(cfg, batch), cfg, timm_entry, tnote)]
    if dtype == "bfloat16" and label == "parallel" and not err and args.extra:
        cast = dataclasses.replace(base_cfg, dtype=dtype)
        call = torch_vitctl(cast, batch)
        group.append(Entry(f"vitctl-torch {label} {d} params fp32", "torch", label, dtype, batch, call, cast, timm_entry, "cast at use"))
    group.append(timm)
    if label == "parallel" and dtype == "float32" and not args.quick:
        unfused = dataclasses.replace(cfg, fused=False)
        call = torch_vitctl(unfused, batch)
        note = "no per-call weight concat"
        group.append(Entry(f"vitctl-torch {label} {d} fused=False", "torch", label, dtype, batch, call, unfused, timm_entry, note))
    return group


def jax_entries(label: str, dtype: str, batch: int, args: argparse.Namespace) -> list[Entry]:
    """vitctl-jax rows of one (config, dtype), each compiled ahead of time."""
    base_cfg = CONFIGS[label][0]
    d = DT_SHORT[dtype]
    variants = [(dataclasses.replace(base_cfg, dtype=dtype), "" if dtype == "float32" else "params fp32, cast at use")]
    if label == "parallel" and dtype == "bfloat16" and args.extra:
        variants.append((dataclasses.replace(base_cfg, dtype=dtype, param_dtype=dtype), "param_dtype bf16"))
    if label == "parallel" and dtype == "float32" and not args.quick:
        variants.append((dataclasses.replace(base_cfg, fused=False), "fused=False"))
    entries = []
    for jcfg, jnote in variants:
        log(f"compile: vitctl-jax {label} {d} {jnote} ...")
        call, compile_s = C.jax_forward(jcfg, batch)
        suffix = "" if not jnote or jnote.startswith("params fp32") else " " + jnote
        note = ", ".join(filter(None, [jnote if not suffix else "", f"compile {compile_s:.1f} s"]))
        entries.append(Entry(f"vitctl-jax {label} {d}{suffix}", "jax", label, dtype, batch, call, jcfg, f"timm {label} {d}", note))
    return entries


def measure_models(args: argparse.Namespace, bf16_batch: int, gate, notes: list[str]) -> list[list[Entry]]:
    """Every row, in groups of one (config, dtype), each group timed interleaved."""
    groups = []
    for dtype in ("float32", "bfloat16"):
        for label in CONFIGS:
            torch_batch = bf16_batch if dtype == "bfloat16" else args.batch_size
            group = torch_entries(label, dtype, torch_batch, args, notes) + jax_entries(label, dtype, args.batch_size, args)
            log(f"time: {label} {DT_SHORT[dtype]}: " + ", ".join(e.name for e in group) + " ...")
            for e, ts in zip(group, C.interleaved_times({e.name: e.call for e in group}, args.warmup, args.iters, gate).values()):
                e.times = ts
            groups.append(group)
    return groups


# ----------------------------------------------------------------------------- report
def report_rows(groups: list[list[Entry]], gemm: dict[str, dict]) -> tuple[list[dict], list[list[str]]]:
    """(the JSON rows, the forward table's rows)."""
    entries = {e.name: e for g in groups for e in g}
    rows_json, table = [], []
    for label, rates in gemm.items():
        for shape, r in rates.items():
            rows_json.append(C.Row(f"gemm {label} {C.fmt_shape(shape)}", r, "GFLOP/s").as_dict())
    for e in (e for g in groups for e in g):
        base = entries.get(e.baseline) if e.baseline else None
        ratio = e.img_s / base.img_s if base else None
        plabel, pval = peak(gemm, e.framework, e.dtype)
        rows_json.append(C.Row(f"{e.name} images/s", e.img_s, "images/s", f"{e.baseline} images/s" if base else None, ratio).as_dict())
        rows_json.append(C.Row(f"{e.name} GFLOP/s", e.gflops, "GFLOP/s", f"gemm peak {plabel}", e.gflops / pval).as_dict())
        table.append([
            e.name, str(e.batch), f"{e.img_s:.2f}", f"{e.median_img_s:.2f}", f"{min(e.times):.3f}", f"{e.gflops:.1f}",
            f"{ratio:.2f}x" if ratio else "-", f"{100 * e.gflops / pval:.0f}% of {plabel}", e.note,
        ])  # fmt: skip
    return rows_json, table


def print_header(settings: dict[str, str], gemm: dict[str, dict], batch: int, bf16_batch: int) -> None:
    print("vitctl forward benchmark (bench/forward.py)")
    for k, v in settings.items():
        print(f"  {k}: {v}")
    print("  configs compared:")
    for label, (cfg, timm_name) in CONFIGS.items():
        flops = C.flops(cfg)
        print(
            f"    {label}: vitctl {cfg.block} block, norm={cfg.norm}, qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, "
            f"gelu_approximate={cfg.gelu_approximate}, pool={cfg.pool}, fused={cfg.fused}, T={cfg.seq_len}  vs  timm {timm_name}; "
            f"{flops / 1e9:.2f} GFLOP/image"
        )
    print("  FLOPs/image = 2*MACs: 2*Np*P*P*C*D + L*(2*T*(4*D*D + 2*D*F) + 4*T*T*D) + 2*D*classes (+ MAP head if any)")
    print("  bf16: timm = model.to(torch.bfloat16), bf16 input (no autocast); vitctl-torch = dtype+param_dtype bfloat16;")
    print("        vitctl-jax = dtype bfloat16 with fp32 params cast at use (unless the row says param_dtype bf16)")
    if bf16_batch != batch:
        print(f"  torch bf16 rows run at batch {bf16_batch}: torch's bf16 GEMM here is {peak(gemm, 'torch', 'bfloat16')[1]:.1f} GFLOP/s "
              f"vs {peak(gemm, 'torch', 'float32')[1]:.1f} fp32 (no native bf16 kernel on this CPU); --bf16-batch-size {batch} to override")  # fmt: skip
    print()


def print_tables(gemm: dict[str, dict], table: list[list[str]], quick: bool) -> None:
    gemm_rows = [[label, C.fmt_shape(s), f"{r:.1f}"] for label, rates in gemm.items() for s, r in rates.items()]
    C.print_table(
        "GEMM peak (best of repeated calls" + ("" if quick else ", two passes: before and after the models") + ")",
        ["kernel", "shape (MxK)@(KxN)", "GFLOP/s"],
        gemm_rows,
    )
    C.print_table(
        "Forward throughput",
        ["model", "batch", "img/s (best)", "img/s (median)", "s/batch (best)", "GFLOP/s", "vs timm same cfg+dtype", "of GEMM peak", "note"],
        table,
    )


def print_footer(notes: list[str], groups: list[list[Entry]], gemm: dict[str, dict], load: dict, load_line: str, gate) -> None:
    for n in notes:
        print(f"note: {n}")
    if any(e.gflops > peak(gemm, e.framework, e.dtype)[1] for g in groups for e in g):
        print(
            "note: above 100% of the GEMM peak: the GEMM probe met a busier moment than the model did, or the model's shapes suit the kernel better"
        )
    print(f"load: {load_line};")
    print(f"      {gate.describe()}")
    if gate.busy_starts:
        print(f"warning: {gate.busy_starts} timed calls started while other processes were busy; their numbers are low "
              "(interleaved ratios hold better); rerun on a quiet machine or raise --max-wait")  # fmt: skip
    elif load.get("other_processes_frac", 0) > 0.1:
        print("note: other processes were busy at times; timed calls were held back until the CPUs were quiet")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    B = args.batch_size
    gate = C.QuietGate(args.max_wait)
    monitor = C.LoadMonitor()
    import torch

    cores = C.num_cores()
    torch.set_num_threads(cores)
    settings = describe_settings(args, cores)
    shapes = C.gemm_shapes(CONFIGS["classic"][0], B)
    gemm = measure_gemm(shapes, B, args.quick, gate)
    torch_bf16_slow = peak(gemm, "torch", "bfloat16")[1] < 0.25 * peak(gemm, "torch", "float32")[1]
    B16 = args.bf16_batch_size or (1 if torch_bf16_slow else B)
    notes: list[str] = []
    groups = measure_models(args, B16, gate, notes)
    if not args.quick:
        measure_gemm_again(gemm, shapes, gate)
    rows_json, table = report_rows(groups, gemm)
    load, load_line = monitor.summary(), monitor.describe()
    if args.json:
        print(json.dumps({"rows": rows_json, "settings": settings, "notes": notes, "load": {**load, "quiet_gate": gate.describe()}}))
        return 0
    print_header(settings, gemm, B, B16)
    print_tables(gemm, table, args.quick)
    print_footer(notes, groups, gemm, load, load_line, gate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
