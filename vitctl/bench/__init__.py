"""`vitctl bench`: what this hardware does with vitctl's models, side by side with timm and
with each framework's GEMM peak, all measured in one run. Also the measuring toolkit of
the scripts in bench/.

    measure.py   the machine and its load, quiet gate, interleaved timing, child processes
    gemm.py      analytic FLOPs, GEMM peaks per framework and dtype
    models.py    the timed calls: vitctl-torch, timm, vitctl-jax, the plain Flax baseline
    rows.py      Row, ratios, tables
    sections.py  the seven sections (SECTIONS), each adding its rows
    harness.py   modes, the report, run()

Imports the standard library and numpy at module level: torch, jax and timm are imported
by the functions that need them, so `vitctl --help` stays light. timm is optional: without
it its rows say so. So is the plain Flax baseline, bench/plain_flax.py, which lives beside
the benchmark scripts in the source checkout, not in the library: where vitctl runs
without that checkout (an installed wheel), the plain-flax rows say so.

Rows. Every result is a Row(name, value, unit, baseline, ratio, note); `baseline` names
another row (or is None) and `ratio = value / that row's value`. So:
- GEMM rows: GFLOP/s of one matmul per framework and dtype (best over the model's own
  shapes); no baseline.
- forward / train rows of vitctl-torch: images/s, baseline the timm row of the same
  configuration, dtype and batch (ratio > 1: vitctl is faster).
- vitctl-jax rows: images/s against plain-flax (forward) or timm + AdamW (train step), and
  GFLOP/s against the best fp32 GEMM row of the run (ratio = the fraction of the GEMM peak
  reached; the train-step one is MFU).
- plain-flax rows (forward): the same configuration written the straightforward way in
  Flax NNX (bench/plain_flax.py, loaded with the same weights), timed interleaved with
  vitctl-jax; images/s against timm.
- convert: GB/s of `vitctl convert jax-to-torch` against `cp -r` of the same bytes.
- info / plan vit-22b: seconds and peak RSS of the command, against `vitctl --help`.

Configurations (Mode): classic = vitctl `B/16` (sequential block, LayerNorm, tanh GELU,
QKV bias, class token); parallel = `vit22b-B/16` with pool "tok" (parallel block,
QK-norm, RMSNorm; the class token instead of the MAP head, as timm's
`vit_base_patch16_xp_224`). timm's model is built from vitctl's config by
`vitctl.convert.timm.timm_spec`: the same function, so the same FLOPs.
- full: B/16, forward at batch 1, 8 and 32; train at batch 8; 1 warm-up + 3 timed
  rounds; GEMM probes of >= 0.3 s each; up to 120 s waiting for a quiet machine.
- quick: S/16 instead of B/16 everywhere (4x fewer FLOPs), forward at batch 1 and 8;
  1 warm-up + 1 timed round; GEMM probes of >= 0.1 s; no oneDNN GEMM probe; up to
  15 s waiting for a quiet machine.
- tiny (tests; `vitctl bench --tiny`, hidden): 2-layer width-32 models on 32 px images,
  batch 1 and 2, one round, one GEMM shape, no waiting: checks that every part runs;
  its figures mean nothing.
Where torch's bf16 GEMM runs below a quarter of its fp32 rate (no native bf16 on the
CPU: a reference kernel), the torch bf16 forward rows run at the smallest batch only.

Timing: measure.py; FLOPs: gemm.flops.
"""

from vitctl.bench.gemm import best_rate, flops, fmt_shape, gemm_shapes, torch_gemm_gflops, torch_mkldnn_gemm_gflops, xla_gemm_gflops
from vitctl.bench.harness import MODES, Mode, Report, run
from vitctl.bench.measure import (
    LoadMonitor,
    QuietGate,
    Run,
    cpu_description,
    disk_bytes,
    interleaved_times,
    machine,
    num_cores,
    others_busy,
    proc_stat_busy,
    run_command,
    vitctl_command,
)
from vitctl.bench.models import (
    jax_forward,
    jax_train_step,
    plain_flax,
    timm_available,
    timm_model,
    timm_spec_name,
    torch_forward,
    torch_train_step,
    vitctl_torch_model,
)
from vitctl.bench.rows import Row, fmt_value, link, print_table, rows_table, short_baseline, table
from vitctl.bench.sections import DT_SHORT, INFO_CMD, PLAN_CMD, SECTIONS, TIMM_MISSING

__all__ = [
    "DT_SHORT",
    "INFO_CMD",
    "MODES",
    "PLAN_CMD",
    "SECTIONS",
    "TIMM_MISSING",
    "LoadMonitor",
    "Mode",
    "QuietGate",
    "Report",
    "Row",
    "Run",
    "best_rate",
    "cpu_description",
    "disk_bytes",
    "flops",
    "fmt_shape",
    "fmt_value",
    "gemm_shapes",
    "interleaved_times",
    "jax_forward",
    "jax_train_step",
    "link",
    "machine",
    "num_cores",
    "others_busy",
    "plain_flax",
    "print_table",
    "proc_stat_busy",
    "rows_table",
    "run",
    "run_command",
    "short_baseline",
    "table",
    "timm_available",
    "timm_model",
    "timm_spec_name",
    "torch_forward",
    "torch_gemm_gflops",
    "torch_mkldnn_gemm_gflops",
    "torch_train_step",
    "vitctl_command",
    "vitctl_torch_model",
    "xla_gemm_gflops",
]
