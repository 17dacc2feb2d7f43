"""The sections of `vitctl bench`, each a method of Bench that adds its rows as it measures
them (what each row is: vitctl/bench/__init__.py)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vitctl.bench.gemm import flops, fmt_shape, gemm_shapes, torch_gemm_gflops, torch_mkldnn_gemm_gflops, xla_gemm_gflops
from vitctl.bench.measure import QuietGate, disk_bytes, interleaved_times, run_command, vitctl_command
from vitctl.bench.models import (
    PLAIN_FLAX_MISSING,
    jax_forward,
    jax_train_step,
    plain_flax,
    timm_available,
    timm_model,
    timm_spec_name,
    torch_forward,
    torch_train_step,
    vitctl_torch_model,
    vitctl_train_step,
)
from vitctl.bench.modes import Mode
from vitctl.bench.rows import Row, fmt_value
from vitctl.params import random_weights

SECTIONS = ("gemm", "torch-forward", "jax-forward", "torch-train", "jax-train", "convert", "cli")
DT_SHORT = {"float32": "fp32", "bfloat16": "bf16"}
TIMM_MISSING = "timm not installed"
INFO_CMD = ("info", "vit-22b")
PLAN_CMD = ("plan", "vit-22b", "--mesh", "data=1,fsdp=256,tensor=4", "--batch-size", "1024")


class Bench:
    """One run: the rows so far, the gate, the peaks."""

    def __init__(self, mode: Mode, log: Callable[[str], None]):
        self.mode, self.log = mode, log
        self.gate = QuietGate(mode.gate_budget_s)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.cfgs = mode.configs()
        self.has_timm = timm_available()
        self.peak_fp32: str | None = None  # name of the best fp32 GEMM row
        self.torch_bf16_batches = mode.batches

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
        for r in rows:  # each row as it is measured: progress, and what an interruption keeps
            self.log(f"row: {r.name} = {fmt_value(r.value)} {r.unit}")

    def timed(self, fns: dict[str, Callable[[], object]], warmup: int | None = None) -> dict[str, float]:
        """Best seconds per call of each fn, interleaved."""
        ts = interleaved_times(fns, self.mode.warmup if warmup is None else warmup, self.mode.iters, self.gate)
        return {k: min(v) for k, v in ts.items()}

    # --- sections -----------------------------------------------------------------------
    def gemm(self) -> None:
        m = self.mode
        shapes = gemm_shapes(self.cfgs["classic"], m.train_batch)[: 1 if m.size == "tiny" else None]
        kw = {"min_time": m.gemm_min_time, "max_reps": m.gemm_max_reps}
        probes = [("GEMM torch fp32 (MKL)", lambda: torch_gemm_gflops("float32", shapes, **kw))]
        if m.onednn:
            probes.append(("GEMM torch fp32 (oneDNN)", lambda: torch_mkldnn_gemm_gflops(shapes, **kw)))
        # bf16 may hit a reference kernel (seconds per call): one shape, two calls.
        probes.append(("GEMM torch bf16", lambda: torch_gemm_gflops("bfloat16", shapes[:1], min_time=0.0, max_reps=2)))
        probes += [
            ("GEMM XLA fp32", lambda: xla_gemm_gflops("float32", shapes, **kw)),
            ("GEMM XLA bf16", lambda: xla_gemm_gflops("bfloat16", shapes, **kw)),
        ]
        rates = {}
        for name, probe in probes:
            self.log(f"{name} ...")
            self.gate.wait()
            per_shape = probe()
            best = max(per_shape, key=per_shape.get)
            rates[name] = per_shape[best]
            self.add(Row(name, per_shape[best], "GFLOP/s", note=f"best of {len(per_shape)} shapes: {fmt_shape(best)}"))
        self.peak_fp32 = max((n for n in rates if "fp32" in n), key=rates.get)
        if rates["GEMM torch bf16"] < 0.25 * rates["GEMM torch fp32 (MKL)"]:
            self.torch_bf16_batches = m.batches[:1]
            self.bf16_note = (
                f"torch's bf16 GEMM runs at {rates['GEMM torch bf16']:.1f} GFLOP/s here against {rates['GEMM torch fp32 (MKL)']:.1f} "
                f"fp32 (no native bf16 kernel on this CPU): the torch bf16 forward rows run at batch {m.batches[0]} only"
            )

    def _timm_rows(self, names: list[str], unit: str) -> None:
        self.add(*(Row(n, None, unit, note=TIMM_MISSING) for n in names))

    def torch_forward(self) -> None:
        if self.torch_bf16_batches != self.mode.batches:
            self.notes.append(self.bf16_note)
        for dtype in ("float32", "bfloat16"):
            d = DT_SHORT[dtype]
            for key, base in self.cfgs.items():
                cfg = base if dtype == "float32" else dataclasses.replace(base, dtype=dtype, param_dtype=dtype)
                ours = vitctl_torch_model(cfg)
                theirs = timm_model(base, dtype) if self.has_timm else None
                for b in self.torch_bf16_batches if dtype == "bfloat16" else self.mode.batches:
                    prefix = f"forward {self.mode.label(key)} {d} b{b}"
                    fns = {f"{prefix} vitctl-torch": torch_forward(ours, cfg, b, dtype)}
                    if theirs is not None:
                        fns[f"{prefix} timm"] = torch_forward(theirs, base, b, dtype)
                    self.log(f"time {prefix} ...")
                    best = self.timed(fns)
                    self.add(Row(f"{prefix} vitctl-torch", b / best[f"{prefix} vitctl-torch"], "images/s", f"{prefix} timm"))
                    if theirs is not None:
                        self.add(Row(f"{prefix} timm", b / best[f"{prefix} timm"], "images/s", note=timm_spec_name(base)))
                    else:
                        self._timm_rows([f"{prefix} timm"], "images/s")

    def jax_forward(self) -> None:
        b, baseline = self.mode.train_batch, plain_flax()
        if baseline is None:
            self.notes.append(f"{PLAIN_FLAX_MISSING}: the plain-flax rows are empty and so are the ratios against them")
        for key, cfg in self.cfgs.items():
            prefix = f"forward {self.mode.label(key)} fp32 b{b}"
            self.log(f"compile {prefix} vitctl-jax{'' if baseline is None else ' and plain-flax'} ...")
            call, compile_s = jax_forward(cfg, b)
            rivals, plain_note = {}, PLAIN_FLAX_MISSING
            if baseline is not None:
                rivals["plain-flax"], plain_s = baseline.plain_flax_forward(cfg, b)
                plain_note = f"bench/plain_flax.py: nnx.Conv/Linear/norms, einsum attention, loop over blocks; compile {plain_s:.1f} s"
            note, of_peak = f"compile {compile_s:.1f} s", "fraction of the GEMM peak"
            s = self._jax_rows(prefix, call, b, flops(cfg, b), "plain-flax", note, of_peak, rivals)
            value = b / s["plain-flax"] if rivals else None
            self.add(Row(f"{prefix} plain-flax", value, "images/s", f"{prefix} timm", note=plain_note))
            self._timm_baseline(f"{prefix} timm", lambda cfg=cfg: torch_forward(timm_model(cfg), cfg, b, "float32"), b)

    def _jax_rows(
        self, prefix: str, call: Callable[[], None], batch: int, flop: int, base: str, note: str, of_peak: str, rivals: dict | None = None
    ) -> dict[str, float]:
        """Times a vitctl-jax call, interleaved with `rivals` ({name: call}): images/s against the row
        `prefix base`, GFLOP/s against the fp32 GEMM peak; returns best seconds per call by name."""
        self.log(f"time {prefix} vitctl-jax{''.join(', ' + r for r in rivals or ())} ...")
        best = self.timed({"vitctl-jax": call, **(rivals or {})})
        s = best["vitctl-jax"]
        self.add(
            Row(f"{prefix} vitctl-jax", batch / s, "images/s", f"{prefix} {base}", note=note),
            Row(f"{prefix} vitctl-jax GFLOP/s", flop / s / 1e9, "GFLOP/s", self.peak_fp32, note=f"ratio: {of_peak}"),
        )
        return best

    def _timm_baseline(self, name: str, make: Callable[[], Callable[[], None]], batch: int) -> None:
        """Adds the timm row `name` unless a section already measured it."""
        if any(r.name == name for r in self.rows):
            return
        if not self.has_timm:
            return self._timm_rows([name], "images/s")
        self.log(f"time {name} ...")
        s = self.timed({"timm": make()})["timm"]
        self.add(Row(name, batch / s, "images/s"))

    def torch_train(self) -> None:
        """`vitctl train --backend torch`'s step (torch_optim's AdamW, clipping) against timm + torch.optim.AdamW,
        and its GFLOP/s against the fp32 GEMM peak of this run (MFU)."""
        b, cfg = self.mode.train_batch, self.cfgs["parallel"]
        prefix = f"train {self.mode.label('parallel')} fp32 b{b}"
        fns = {"vitctl-torch": vitctl_train_step(cfg, b)}
        if self.has_timm:
            fns["timm"] = torch_train_step(timm_model(cfg), cfg, b)
        self.log(f"time {prefix} vitctl-torch (vitctl train's step){', timm + AdamW' if self.has_timm else ''} ...")
        best = self.timed(fns, warmup=max(1, self.mode.warmup))  # the first step allocates the optimizer state
        s = best["vitctl-torch"]
        self.add(
            Row(f"{prefix} vitctl-torch", b / s, "images/s", f"{prefix} timm+AdamW", note="vitctl train --backend torch's step, AdamW"),
            Row(f"{prefix} vitctl-torch GFLOP/s", flops(cfg, b, train=True) / s / 1e9, "GFLOP/s", self.peak_fp32,
                note="ratio: MFU against the GEMM peak"),
        )  # fmt: skip
        if self.has_timm:
            self.add(Row(f"{prefix} timm+AdamW", b / best["timm"], "images/s", note=timm_spec_name(cfg)))
        else:
            self._timm_rows([f"{prefix} timm+AdamW"], "images/s")

    def jax_train(self) -> None:
        b, cfg = self.mode.train_batch, self.cfgs["parallel"]
        prefix = f"train {self.mode.label('parallel')} fp32 b{b}"
        self.log(f"compile {prefix} vitctl-jax (vitctl train's step) ...")
        call, first_s = jax_train_step(cfg, b)
        note = f"vitctl.train step, AdamW; compile+1st step {first_s:.1f} s"
        self._jax_rows(prefix, call, b, flops(cfg, b, train=True), "timm+AdamW", note, "MFU against the GEMM peak")
        self._timm_baseline(f"{prefix} timm+AdamW", lambda: torch_train_step(timm_model(cfg), cfg, b), b)

    def convert(self) -> None:
        from vitctl import checkpoint as ckpt
        from vitctl.formats import layout

        cfg = self.cfgs["parallel"]
        label = self.mode.label("parallel")
        with tempfile.TemporaryDirectory(prefix="vitctl-bench-") as tmp:
            src, dst, copy = Path(tmp) / "src", Path(tmp) / "dst", Path(tmp) / "copy"
            self.log(f"write a {label} vitctl-jax checkpoint ...")
            src.mkdir()
            ckpt.write_config(src, cfg, {"created_by": "vitctl bench"})
            layout.save_jax(src, random_weights(cfg))
            nbytes = disk_bytes(src)
            cps = []
            for i in range(2):  # cp before and after: both sides meet the same page-cache state and load
                self.gate.wait()
                cps.append(run_command(["cp", "-r", "--reflink=never", str(src), str(copy)]).seconds)
                shutil.rmtree(copy)
                if i == 0:
                    self.log(f"vitctl convert jax-to-torch {label} ...")
                    self.gate.wait()
                    r = run_command([*vitctl_command(), "convert", "jax-to-torch", str(src), str(dst)])
                    if r.exit_code:
                        raise RuntimeError(f"vitctl convert failed: {r.stderr.strip()[-500:]}")
                    shutil.rmtree(dst)
        cp_s = sum(cps) / len(cps)
        size = f"{nbytes / 2**20:.0f} MiB"
        self.add(
            Row(f"convert jax-to-torch {label}", nbytes / r.seconds / 1e9, "GB/s", "cp -r (same bytes)", note=f"{size}, peak RSS {r.maxrss_bytes / 2**20:.0f} MiB, {r.seconds:.2f} s"),
            Row("cp -r (same bytes)", nbytes / cp_s / 1e9, "GB/s", note=f"{size}, mean of 2 runs around the conversion"),
        )  # fmt: skip

    def cli(self) -> None:
        cmds = {"vitctl --help": ("--help",), "vitctl info vit-22b": INFO_CMD, "vitctl plan vit-22b": PLAN_CMD}
        results = {}
        for name, args in cmds.items():
            self.log(f"{name} ...")
            self.gate.wait()
            r = run_command([*vitctl_command(), *args])
            if r.exit_code:
                raise RuntimeError(f"{name} failed: {r.stderr.strip()[-500:]}")
            results[name] = r
        for name, r in results.items():
            base = None if name == "vitctl --help" else "vitctl --help"
            self.add(
                Row(f"{name} time", r.seconds, "s", base and f"{base} time", note="vitctl " + " ".join(cmds[name])),
                Row(f"{name} peak RSS", r.maxrss_bytes / 2**20, "MiB", base and f"{base} peak RSS"),
            )
