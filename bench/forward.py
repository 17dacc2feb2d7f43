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


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
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
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    iters = args.iters if args.iters is not None else (1 if args.quick else 3)
    B = args.batch_size
    gate = C.QuietGate(args.max_wait if args.max_wait is not None else (20.0 if args.quick else 60.0))

    monitor = C.LoadMonitor()
    import torch

    cores = C.num_cores()
    torch.set_num_threads(cores)
    import jax

    settings = {
        "cpu": C.cpu_description(),
        "torch": f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads (set_num_threads({cores})), "
        f"{torch.get_num_interop_threads()} inter-op, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, mkldnn {'on' if torch.backends.mkldnn.is_available() else 'off'}",
        "jax": f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, XLA CPU intra-op pool = all "
        f"{cores} cores (XLA default), XLA_FLAGS={os.environ.get('XLA_FLAGS', 'unset')}, default matmul precision (fp32 = full)",
        "method": f"batch {B}, 224 px, {warmup} warm-up + {iters} timed rounds, rows of one (config, dtype) interleaved; "
        "images/s = batch / best round (median also shown); torch.inference_mode()",
    }

    # --- GEMM peaks ---------------------------------------------------------------------
    cfg0 = CONFIGS["classic"][0]
    shapes = C.gemm_shapes(cfg0, B)
    # bf16 may hit a reference kernel: the batch's MLP-in shape and the batch-1 one (the
    # torch bf16 rows fall back to batch 1 there) are enough.
    bf16_shapes = [shapes[0], (cfg0.seq_len, cfg0.width, cfg0.mlp_dim)] if B > 1 else shapes[:1]
    gemm: dict[str, dict] = {}  # label -> {shape: GFLOP/s}
    gate.wait()
    log("GEMM: torch fp32 (F.linear, MKL) ...")
    gemm["torch fp32 F.linear (MKL)"] = C.torch_gemm_gflops("float32", shapes)
    if not args.quick:
        log("GEMM: torch fp32 (oneDNN MkldnnLinear) ...")
        gemm["torch fp32 MkldnnLinear (oneDNN)"] = C.torch_mkldnn_gemm_gflops(shapes)
    log("GEMM: torch bf16 (F.linear) ...")
    gemm["torch bf16 F.linear"] = C.torch_gemm_gflops("bfloat16", bf16_shapes, min_time=0.0, max_reps=2)
    log("GEMM: XLA fp32 and bf16 (jit a @ b) ...")
    gemm["XLA fp32 jit(a @ b)"] = C.xla_gemm_gflops("float32", shapes)
    gemm["XLA bf16 jit(a @ b)"] = C.xla_gemm_gflops("bfloat16", shapes)

    def peak(framework: str, dtype: str) -> tuple[str, float]:
        prefix = ("torch " if framework == "torch" else "XLA ") + DT_SHORT[dtype]
        label, rates = max(((k, v) for k, v in gemm.items() if k.startswith(prefix)), key=lambda kv: max(kv[1].values()))
        return label, max(rates.values())

    torch_bf16_slow = peak("torch", "bfloat16")[1] < 0.25 * peak("torch", "float32")[1]
    B16 = args.bf16_batch_size or (1 if torch_bf16_slow else B)

    # --- models -------------------------------------------------------------------------
    groups: list[list[Entry]] = []
    notes: list[str] = []
    for dtype in ("float32", "bfloat16"):
        for label, (base_cfg, timm_name) in CONFIGS.items():
            d = DT_SHORT[dtype]
            tb = B16 if dtype == "bfloat16" else B
            group = []
            timm_entry = f"timm {label} {d}"
            log(f"build: {label} {d} ...")
            group.append(Entry(timm_entry, "torch", label, dtype, tb, torch_timm(base_cfg, dtype, tb), base_cfg, note=timm_name))
            err = ""
            if dtype == "float32":
                cfg = base_cfg
                tnote = ""
            else:
                cfg = dataclasses.replace(base_cfg, dtype=dtype, param_dtype=dtype)
                tnote = "param_dtype bf16"
                err = probe_torch_cast_at_use(base_cfg)
                if err:
                    notes.append(f"vitctl-torch {label}: dtype=bfloat16 with fp32 params fails ({err})")
            group.insert(0, Entry(f"vitctl-torch {label} {d}", "torch", label, dtype, tb, torch_vitctl(cfg, tb), cfg, timm_entry, tnote))
            if dtype == "bfloat16" and label == "parallel" and not err and args.extra:
                cast = dataclasses.replace(base_cfg, dtype=dtype)
                group.insert(
                    1,
                    Entry(
                        f"vitctl-torch {label} {d} params fp32",
                        "torch",
                        label,
                        dtype,
                        tb,
                        torch_vitctl(cast, tb),
                        cast,
                        timm_entry,
                        "cast at use",
                    ),
                )
            if label == "parallel" and dtype == "float32" and not args.quick:
                unfused = dataclasses.replace(cfg, fused=False)
                group.append(
                    Entry(
                        f"vitctl-torch {label} {d} fused=False",
                        "torch",
                        label,
                        dtype,
                        tb,
                        torch_vitctl(unfused, tb),
                        unfused,
                        timm_entry,
                        "no per-call weight concat",
                    )
                )
            jax_variants = [(dataclasses.replace(base_cfg, dtype=dtype), "" if dtype == "float32" else "params fp32, cast at use")]
            if label == "parallel" and dtype == "bfloat16" and args.extra:
                jax_variants.append((dataclasses.replace(base_cfg, dtype=dtype, param_dtype=dtype), "param_dtype bf16"))
            if label == "parallel" and dtype == "float32" and not args.quick:
                jax_variants.append((dataclasses.replace(base_cfg, fused=False), "fused=False"))
            for jcfg, jnote in jax_variants:
                log(f"compile: vitctl-jax {label} {d} {jnote} ...")
                call, compile_s = C.jax_forward(jcfg, B)
                suffix = "" if not jnote or jnote.startswith("params fp32") else " " + jnote
                note = ", ".join(filter(None, [jnote if not suffix else "", f"compile {compile_s:.1f} s"]))
                group.append(Entry(f"vitctl-jax {label} {d}{suffix}", "jax", label, dtype, B, call, jcfg, timm_entry, note))
            log(f"time: {label} {d}: " + ", ".join(e.name for e in group) + " ...")
            for e, ts in zip(group, C.interleaved_times({e.name: e.call for e in group}, warmup, iters, gate).values()):
                e.times = ts
            groups.append(group)

    if not args.quick:  # a second look at the peaks, so one busy moment cannot set them
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

    # --- report -------------------------------------------------------------------------
    entries = {e.name: e for g in groups for e in g}
    rows_json, table = [], []
    for label, rates in gemm.items():
        for shape, r in rates.items():
            rows_json.append(C.Row(f"gemm {label} {C.fmt_shape(shape)}", r, "GFLOP/s").as_dict())
    for g in groups:
        for e in g:
            base = entries.get(e.baseline) if e.baseline else None
            ratio = e.img_s / base.img_s if base else None
            plabel, pval = peak(e.framework, e.dtype)
            rows_json.append(C.Row(f"{e.name} images/s", e.img_s, "images/s", f"{e.baseline} images/s" if base else None, ratio).as_dict())
            rows_json.append(C.Row(f"{e.name} GFLOP/s", e.gflops, "GFLOP/s", f"gemm peak {plabel}", e.gflops / pval).as_dict())
            table.append([
                e.name, str(e.batch), f"{e.img_s:.2f}", f"{e.median_img_s:.2f}", f"{min(e.times):.3f}", f"{e.gflops:.1f}",
                f"{ratio:.2f}x" if ratio else "-", f"{100 * e.gflops / pval:.0f}% of {plabel}", e.note,
            ])  # fmt: skip
    load = monitor.summary()
    load_line = monitor.describe()
    if args.json:
        print(json.dumps({"rows": rows_json, "settings": settings, "notes": notes, "load": {**load, "quiet_gate": gate.describe()}}))
        return 0

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
    if B16 != B:
        print(f"  torch bf16 rows run at batch {B16}: torch's bf16 GEMM here is {peak('torch', 'bfloat16')[1]:.1f} GFLOP/s "
              f"vs {peak('torch', 'float32')[1]:.1f} fp32 (no native bf16 kernel on this CPU); --bf16-batch-size {B} to override")  # fmt: skip
    print()
    gemm_rows = [[label, C.fmt_shape(s), f"{r:.1f}"] for label, rates in gemm.items() for s, r in rates.items()]
    C.print_table(
        "GEMM peak (best of repeated calls" + ("" if args.quick else ", two passes: before and after the models") + ")",
        ["kernel", "shape (MxK)@(KxN)", "GFLOP/s"],
        gemm_rows,
    )
    C.print_table(
        "Forward throughput",
        ["model", "batch", "img/s (best)", "img/s (median)", "s/batch (best)", "GFLOP/s", "vs timm same cfg+dtype", "of GEMM peak", "note"],
        table,
    )
    for n in notes:
        print(f"note: {n}")
    if any(e.gflops > peak(e.framework, e.dtype)[1] for g in groups for e in g):
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
