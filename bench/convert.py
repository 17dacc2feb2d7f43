"""`vitctl convert` on a synthetic checkpoint of at least 4 GiB per source format: peak RSS
of the converting process and its throughput next to `cp` of the same bytes, in one run.

    python bench/convert.py [--size-gib 4] [--repeat 3] [--json] [--keep] [--workdir DIR] [--cases a,b,...] [--max-wait 300]
                            [--tricks all|blas,threads,map,pool,writer,read_ahead,tune]

Cases (source -> target; `--cases` takes the short names):
    jax-torch      vitctl-jax as init/train write it (Orbax OCDBT, uncompressed)
                                                         -> vitctl-torch    jax-to-torch
    jax-timm       the same                              -> timm            jax-to-torch --format timm
    jaxf-torch     vitctl-jax as convert writes it (Orbax, one directory per array, uncompressed)
                                                         -> vitctl-torch    jax-to-torch
    jaxz-torch     Orbax's default from other tools (OCDBT, zstd level 1)
                                                         -> vitctl-torch    jax-to-torch
    torch-jax      vitctl-torch (one model.safetensors)  -> vitctl-jax      torch-to-jax
    shards-jax     vitctl-torch (HF shards + index)      -> vitctl-jax      torch-to-jax
    npz-torch      big_vision .npz, per-layer keys, fp32 -> vitctl-torch    jax-to-torch
    npz16-torch    big_vision .npz, per-layer keys, bf16 -> vitctl-torch    jax-to-torch
    scan-torch     big_vision .npz, scanned (L, ...) fp32 -> vitctl-torch   jax-to-torch

Targets: peak RSS < 1 GiB for the 4 GiB checkpoint; throughput >= 0.5x cp.

Synthetic checkpoints: see bench/convert_sources.py (built in a child process).

Method, per case:
1. build the source if the previous case did not (deleted after its last case unless --keep);
2. read every source file once (page cache warm; nothing is dropped: dropping caches is
   system-wide and other processes share the machine);
3. --repeat times (default 3): `sync`; time `cp -r --reflink=never SRC COPY` (same
   filesystem), delete the copy; `sync`; run `vitctl convert ... --json` as a child, timed
   by wall clock from spawn to exit (imports, planning and writing included), its peak RSS
   from os.wait4's ru_maxrss; delete the output;
4. `sync`; time cp once more, so the last conversion is bracketed too.
The fastest conversion is compared with the fastest cp: best of N on both sides. On this
project's (virtual) machine, writing into the page cache costs ~0.4 CPU-s per GB on memory
the guest used recently and 1-1.5 on memory the VM host has reclaimed (free page reporting),
which swings single runs of cp and of vitctl alike by 2x. Peak RSS is the largest of all runs.
`sync` before each timed command flushes the previous command's dirty pages. Then a quiet
gate waits while other processes use more than a quarter of the CPUs (at most --max-wait
seconds over the whole run); the table shows their share all the same. Neither cp nor vitctl
calls fsync: both times end when the data is in the page cache.
Variants, in turn in each round on the same sources: --against CHECKOUT runs that checkout's
vitctl (a worktree of an earlier commit: before and after); --tricks runs with one speed trick
on its plain path (vitctl.formats.fastcopy's $VITCTL_PLAIN; `tune`: the command's mallopt and
gc.disable made no-ops), then all of them. A second table: each variant's best seconds (alone
and CPU) and peak RSS against the shipped run's (with a trick off: that trick's gain).
Throughput (GB/s, 10^9) for both is the source's bytes on disk / seconds (ratio vs cp = cp s /
convert s). The source's page-cache residency before the conversion: fincore, where installed.

Peak RSS: os.wait4 returns the child's ru_maxrss (KiB on Linux), the high-water mark of its
resident memory over its whole life, imports included. Linux counts the memory of the
process image that exec replaced too, so the child's ru_maxrss is at least its spawner's RSS
at spawn: vitctl.bench.run_command spawns through a fresh small launcher interpreter (cp's
ru_maxrss in the same run shows that floor). The converter's own VmHWM, which it prints in
its --json, is shown next to it. Page cache is not part of RSS.

--json prints one JSON object {"rows": [...], ...} (bench/forward.py's schema) on stdout, progress
goes to stderr. Nothing asserts on time: a missed target is printed as FAIL, the exit code is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert_sources import SOURCES  # bench/ (this script's directory) is first on sys.path

from vitctl import bench as B
from vitctl.bench import QuietGate, Run, disk_bytes
from vitctl.formats.fastcopy import PLAIN_ENV, TRICKS

REPO_ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20
RSS_TARGET = GiB
SPEED_TARGET = 0.5  # x cp
CONVERT_CODE = ("vitctl",)  # what `vitctl convert` runs (the library and its commands)


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    source: str  # a key of SOURCES
    direction: str
    args: tuple[str, ...]
    target: str  # for the table


CASES = [
    Case("jax-torch", "jax", "jax-to-torch", (), "vitctl-torch"),
    Case("jax-timm", "jax", "jax-to-torch", ("--format", "timm"), "timm"),
    Case("jaxf-torch", "jaxf", "jax-to-torch", (), "vitctl-torch"),
    Case("jaxz-torch", "jaxz", "jax-to-torch", (), "vitctl-torch"),
    Case("torch-jax", "torch", "torch-to-jax", (), "vitctl-jax"),
    Case("shards-jax", "shards", "torch-to-jax", (), "vitctl-jax"),
    Case("npz-torch", "npz", "jax-to-torch", (), "vitctl-torch"),
    Case("npz16-torch", "npz16", "jax-to-torch", (), "vitctl-torch"),
    Case("scan-torch", "scan", "jax-to-torch", (), "vitctl-torch"),
]

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- measuring (this process: stdlib only)
def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> float:
    """Reads every file once (into a 1 MiB buffer): the source is then in the page cache, as far as memory allows."""
    t0 = time.perf_counter()
    buf = bytearray(MiB)
    for p in files_of(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def cached_fraction(path: Path) -> float | None:
    """Share of the source's bytes in the page cache (fincore), or None without fincore."""
    if not shutil.which("fincore"):
        return None
    files = files_of(path)
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    res = size = 0
    for line in out.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def cp_once(src: Path, copy: Path, gate: QuietGate, runs: list[Run]) -> None:
    """One timed `cp -r` of the source to a sibling (a real data copy, no reflink); the copy is deleted untimed."""
    os.sync()
    gate.wait()
    r = B.run_command(["cp", "-r", "--reflink=never", str(src), str(copy)])
    if r.exit_code:
        raise SystemExit(f"cp failed: {r.stderr}")
    remove(copy)
    runs.append(r)
    log(f"  cp: {r.seconds:.1f} s")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def self_peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def code_version() -> str:
    """The commit under test, and whether the code `vitctl convert` runs differs from it (best effort: '' outside a git checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", *CONVERT_CODE], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + (" + uncommitted changes in " + ", ".join(CONVERT_CODE) if dirty.stdout.strip() else "")


def pick_workdir(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path.cwd(), REPO_ROOT.parent, Path.home()]
    best, free, seen = None, -1, set()
    for c in candidates:
        try:
            st = c.stat()
            if st.st_dev in seen or not os.access(c, os.W_OK):
                continue
            seen.add(st.st_dev)
            f = shutil.disk_usage(c).free
        except OSError:
            continue
        if f > free:
            best, free = c, f
    return best or Path(tempfile.gettempdir())


@dataclasses.dataclass(frozen=True)
class Variant:
    """How `vitctl convert` runs: as shipped, or with speed tricks turned off."""

    name: str  # "" as shipped; else "no <trick>"
    plain: str = ""  # $VITCTL_PLAIN: the fastcopy tricks that take their plain path
    untuned: bool = False  # neither mallopt nor gc.disable (the command's process tuning)
    tree: str = ""  # another checkout whose vitctl runs instead (first on PYTHONPATH)


SHIPPED = Variant("")
TUNE = "tune"  # the command's process tuning (mallopt, no cyclic gc), beside fastcopy's TRICKS

# `vitctl convert` in a process where the tuning does nothing: gc.disable is a no-op, and
# libc's mallopt (found through ctypes.CDLL, wherever the tuning calls it from) returns at once.
UNTUNED_LAUNCH = """
import ctypes, gc, runpy, sys
gc.disable = lambda: None
class _CDLL(ctypes.CDLL):
    def __getattr__(self, name):
        return (lambda *a: 1) if name == "mallopt" else super().__getattr__(name)
ctypes.CDLL = _CDLL
sys.argv[0] = "vitctl"
runpy.run_module("vitctl", run_name="__main__", alter_sys=True)
"""


def variants(spec: str | None, trees: list[str]) -> list[Variant]:
    """SHIPPED, each --against checkout, then (with --tricks) one variant per trick turned off, then all of them off."""
    shipped = [SHIPPED] + [Variant(f"at {t}", tree=str(Path(t).resolve())) for t in trees]
    if not spec:
        return shipped
    names = [*TRICKS, TUNE] if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = sorted(set(names) - {*TRICKS, TUNE})
    if unknown:
        raise SystemExit(f"--tricks: unknown {unknown}; choose from all, {', '.join([*TRICKS, TUNE])}")
    out = shipped + [Variant(f"no {n}", plain="" if n == TUNE else n, untuned=n == TUNE) for n in names]
    return out + [Variant("plain", ",".join(n for n in names if n != TUNE), TUNE in names)] if len(names) > 1 else out


@dataclasses.dataclass
class Result:
    case: Case
    source: dict  # build()'s description + disk bytes
    converts: list[Run]  # every timed conversion of this case
    cps: list[Run]
    summary: dict  # the fastest conversion's --json
    cached: float | None
    variant: Variant = SHIPPED
    summaries: list[dict] = dataclasses.field(default_factory=list)  # every conversion's --json

    @property
    def convert(self) -> Run:
        """The fastest conversion (the cp baseline is the fastest cp: best of N on both sides)."""
        return min(self.converts, key=lambda r: r.seconds)

    @property
    def run_seconds(self) -> float:
        """The fastest conversion alone (--json `seconds`: no interpreter start, imports or planning)."""
        return min(float(s.get("seconds", 0)) for s in self.summaries)

    @property
    def cpu_seconds(self) -> float:
        return min(r.cpu_seconds for r in self.converts)

    @property
    def cp_seconds(self) -> float:
        return min(r.seconds for r in self.cps)

    @property
    def maxrss_bytes(self) -> int:
        """The largest peak RSS of all conversions of this case (the target applies to each)."""
        return max(r.maxrss_bytes for r in self.converts)

    @property
    def ratio(self) -> float:
        return self.cp_seconds / self.convert.seconds

    @property
    def gbps(self) -> float:
        return self.source["disk_bytes"] / self.convert.seconds / 1e9

    @property
    def cp_gbps(self) -> float:
        return self.source["disk_bytes"] / self.cp_seconds / 1e9

    def targets(self) -> tuple[str, str]:
        """'pass' or 'fail' for the peak RSS and the speed target."""
        return tuple("pass" if ok else "fail" for ok in (self.maxrss_bytes < RSS_TARGET, self.ratio >= SPEED_TARGET))


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f}"


OPTIONS = (  # (flags, argparse keywords)
    ("--size-gib", {"type": float, "default": 4.0, "help": "parameter bytes of each synthetic checkpoint, at least (default 4)"}),
    ("--json", {"action": "store_true", "help": 'print one JSON object {"rows": [...]} on stdout, nothing else there'}),
    ("--keep", {"action": "store_true", "help": "keep the synthetic sources (not the outputs) and print where they are"}),
    ("--workdir", {"help": "where to write (default: a temp dir on the filesystem with the most free space)"}),
    ("--cases", {"default": ",".join(c.key for c in CASES), "help": "comma-separated subset of: " + ", ".join(c.key for c in CASES)}),
    ("--timeout", {"type": float, "default": 3600, "help": "seconds allowed per conversion (default 3600)"}),
    ("--repeat", {"type": int, "default": 3, "help": "timed conversions per case, each after a cp; the fastest of each counts (default 3)"}),
    ("--max-wait", {"type": float, "default": 300,
                        "help": "seconds, over the whole run, to wait for other processes to leave the CPUs before timed commands (default 300)"}),
    ("--against", {"action": "append", "default": [], "metavar": "CHECKOUT",
                       "help": "also convert with the vitctl of another checkout (a git worktree of an earlier commit), in turn"}),
    ("--tricks", {"metavar": "all|NAME,...",
                      "help": f"also convert with each speed trick turned off, one at a time, then all together ({', '.join([*TRICKS, TUNE])})"}),
)  # fmt: skip


def parse_args(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in OPTIONS:
        p.add_argument(flag, **kw)
    return p, p.parse_args(argv)  # fmt: skip


@dataclasses.dataclass
class Session:
    """What every case of one run shares."""

    workdir: Path
    size: int
    args: argparse.Namespace
    variants: list[Variant]
    vitctl: list[str] = dataclasses.field(default_factory=B.vitctl_command)
    gate: QuietGate | None = None
    failures: list[str] = dataclasses.field(default_factory=list)
    built: dict[str, tuple[Path, dict]] = dataclasses.field(default_factory=dict)


def make_workdir(args: argparse.Namespace, cases: list[Case], size: int) -> Path | None:
    """A fresh directory on a filesystem with room for the run; None (after saying why) without one."""
    base = pick_workdir(args.workdir)
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    n_sources = len({c.source for c in cases})
    need = (n_sources + 2) * size if args.keep else 3 * size  # sources (or the current one) + a cp copy + an output
    if free < need:
        print(f"Error: {base} has {free / GiB:.1f} GiB free; this run needs {need / GiB:.1f} GiB "
              f"({'every source kept' if args.keep else 'one source'} + a cp copy + a converted output)", file=sys.stderr)  # fmt: skip
        print("hint: pass --workdir on a larger filesystem, a smaller --size-gib, fewer --cases, or drop --keep", file=sys.stderr)
        return None
    workdir = Path(tempfile.mkdtemp(prefix="vitctl-bench-convert-", dir=base))
    log(f"workdir {workdir} ({free / GiB:.0f} GiB free); checkpoints of >= {args.size_gib:g} GiB; cases: {', '.join(c.key for c in cases)}")
    return workdir


def build_source(case: Case, session: Session) -> tuple[Path, dict]:
    """The case's source, built in a child process unless an earlier case built it."""
    if case.source in session.built:
        return session.built[case.source]
    kind = SOURCES[case.source]
    src = session.workdir / (f"src-{case.source}.npz" if kind.layout.startswith("npz") else f"src-{case.source}")
    log(f"build {kind.label} at {src} ...")
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).with_name("convert_sources.py")), case.source, str(src), str(session.size)]
    b = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if b.returncode:
        print(b.stderr, file=sys.stderr)
        raise SystemExit(f"building {kind.label} failed (exit {b.returncode})")
    info = json.loads(b.stdout.strip().splitlines()[-1])
    info["disk_bytes"] = disk_bytes(src)
    info["build_seconds"] = time.perf_counter() - t0
    log(f"  {info['config']}: {info['tensor_bytes'] / GiB:.2f} GiB of tensors, {info['disk_bytes'] / GiB:.2f} GiB on disk, "
        f"{info['build_seconds']:.0f} s")  # fmt: skip
    session.built[case.source] = (src, info)
    return src, info


def convert_once(case: Case, src: Path, dst: Path, variant: Variant, session: Session) -> tuple[Run, dict] | None:
    """One timed `vitctl convert` of the variant (its output deleted); None (failure noted) if it failed."""
    os.sync()
    session.gate.wait()
    args = ["convert", case.direction, str(src), str(dst), *case.args, "--json"]
    launch = [sys.executable, "-c", UNTUNED_LAUNCH] if variant.untuned else session.vitctl
    launch = [sys.executable, "-P", "-m", "vitctl"] if variant.tree else launch  # -P: not the current directory's vitctl
    env = {**os.environ, PLAIN_ENV: variant.plain, "PYTHONPATH": variant.tree or os.environ.get("PYTHONPATH", "")}
    log(f"  {variant.name + ': ' if variant.name else ''}vitctl {' '.join(args)} ...")
    try:
        run = B.run_command([*launch, *args], session.args.timeout, env=env)
    except TimeoutError as e:
        run = Run(session.args.timeout, 0, -9, 0.0, None, "", str(e))
    remove(dst)
    if run.exit_code:
        session.failures.append(
            f"{case.key}{' ' + variant.name if variant.name else ''}: exit {run.exit_code}: {run.stderr.strip()[-2000:]}"
        )
        log(f"  FAILED (exit {run.exit_code})")
        return None
    summary = json.loads(run.stdout)
    log(f"  convert: {run.seconds:.1f} s (run {summary.get('seconds', 0):.1f} s), peak RSS {run.maxrss_bytes / MiB:.0f} MiB "
        f"(its own VmHWM {summary.get('peak_rss_bytes', 0) / MiB:.0f} MiB)")  # fmt: skip
    return run, summary


def time_case(case: Case, session: Session) -> list[Result]:
    """--repeat rounds of: cp, then one conversion per variant; a last cp; one Result per variant that converted."""
    src, info = build_source(case, session)
    dst, copy = session.workdir / f"out-{case.key}", session.workdir / f"cp-{case.source}"
    log(f"{case.key}: warm the page cache ({warm(src):.1f} s) ...")
    cps: list[Run] = []
    done: dict[Variant, list[tuple[Run, dict]]] = {v: [] for v in session.variants}
    failed: set[Variant] = set()
    cached = None
    for k in range(session.args.repeat):
        cp_once(src, copy, session.gate, cps)
        cached = cached_fraction(src) if cached is None else cached
        for v in session.variants[k:] + session.variants[:k]:  # each round starts with the next variant: none always follows cp
            got = None if v in failed else convert_once(case, src, dst, v, session)
            (done[v].append(got) if got else failed.add(v))
    cp_once(src, copy, session.gate, cps)  # the last conversion is bracketed too
    results = []
    for v, runs in done.items():
        if runs:
            best = min(runs, key=lambda rs: rs[0].seconds)
            results.append(Result(case, info, [r for r, _ in runs], cps, best[1], cached, v, [s for _, s in runs]))
    return results


def run_cases(cases: list[Case], session: Session) -> list[Result]:
    results: list[Result] = []
    last_use = {c.source: c.key for c in cases}
    try:
        for case in cases:
            results += time_case(case, session)
            if last_use[case.source] == case.key and not session.args.keep:
                remove(session.built[case.source][0])
    finally:
        if session.args.keep:
            for p_ in session.workdir.glob("out-*"):
                remove(p_)
            log(f"kept the sources in {session.workdir}")
        else:
            shutil.rmtree(session.workdir, ignore_errors=True)
    return results


METHOD = (
    "per case: read the source once (warm page cache, none dropped); then {repeat}x: sync; cp -r --reflink=never (same "
    "filesystem); sync; vitctl convert ... --json as a child (wall time spawn to exit, imports included; peak RSS = os.wait4 "
    "ru_maxrss){variants}; then one more cp. The fastest conversion against the fastest cp (best of N on both sides: this "
    "machine's page-cache writes cost 3x more on memory the VM host has reclaimed, for cp and vitctl alike); peak RSS: the "
    "largest of all runs. GB/s = source bytes on disk / s (10^9), so ratio vs cp = cp s / convert s. No fsync on either side. "
    "Before each timed command, a quiet gate (see notes)."
)


def case_rows(r: Result) -> tuple[list[dict], list[str]]:
    """The JSON rows and the table row of one case as shipped."""
    name = f"{r.case.key} ({SOURCES[r.case.source].label} -> {r.case.target})"
    rss, s = r.maxrss_bytes, r.summary
    rows = [
        B.Row(f"{name} GB/s", r.gbps, "GB/s", f"cp {r.case.source} GB/s", r.ratio).as_dict(),
        B.Row(f"cp {r.case.source} GB/s", r.cp_gbps, "GB/s").as_dict(),
        B.Row(f"{name} seconds", r.convert.seconds, "s", f"cp {r.case.source} seconds", r.convert.seconds / r.cp_seconds).as_dict(),
        B.Row(f"{name} peak RSS", rss / MiB, "MiB", "target 1024 MiB", rss / RSS_TARGET).as_dict(),
    ]
    table = [
        r.case.key, f"{SOURCES[r.case.source].label} -> {r.case.target}", fmt_gib(r.source["tensor_bytes"]), fmt_gib(r.source["disk_bytes"]),
        f"{r.convert.seconds:.1f}", f"{s.get('seconds', 0):.1f}", f"{r.convert.cpu_seconds:.0f}", f"{r.gbps:.2f}", f"{r.cp_seconds:.1f}",
        f"{r.cp_gbps:.2f}", f"{r.ratio:.2f}x", f"{rss / MiB:.0f}", f"{s.get('peak_rss_bytes', 0) / MiB:.0f}",
        f"{s.get('estimated_peak_bytes', 0) / MiB:.0f}", "-" if r.cached is None else f"{100 * r.cached:.0f}%",
        "-" if r.convert.others_cpu_frac is None else f"{100 * r.convert.others_cpu_frac:.0f}%",
        *(t.replace("fail", "FAIL") for t in r.targets()),
    ]  # fmt: skip
    return rows, table


def trick_rows(r: Result, shipped: Result) -> tuple[list[dict], list[str]]:
    """A variant against the case as shipped: the gain of the tricks it turns off (its seconds / shipped seconds)."""
    gain, cpu_gain = r.run_seconds / shipped.run_seconds, r.cpu_seconds / shipped.cpu_seconds
    label = f"{r.case.key} {r.variant.name}"
    rows = [
        B.Row(f"{label}: run seconds", r.run_seconds, "s", f"{r.case.key} as shipped: run seconds", gain).as_dict(),
        B.Row(f"{label}: CPU seconds", r.cpu_seconds, "s", f"{r.case.key} as shipped: CPU seconds", cpu_gain).as_dict(),
        B.Row(f"{label}: peak RSS", r.maxrss_bytes / MiB, "MiB", f"{r.case.key} as shipped: peak RSS", r.maxrss_bytes / shipped.maxrss_bytes).as_dict(),
    ]  # fmt: skip
    runs = "/".join(f"{float(x.get('seconds', 0)):.2f}" for x in r.summaries)
    table = [r.case.key, r.variant.name or "as shipped", f"{r.run_seconds:.2f}", runs, f"{r.convert.seconds:.1f}", f"{r.cpu_seconds:.1f}",
             f"{r.maxrss_bytes / MiB:.0f}", f"{gain:.2f}x", f"{cpu_gain:.2f}x", f"{r.maxrss_bytes / shipped.maxrss_bytes:.2f}x"]  # fmt: skip
    return rows, table


def report(results: list[Result]) -> tuple[list[dict], list[list[str]], list[list[str]]]:
    """JSON rows, the per-case table (as shipped) and the per-trick table (empty without --tricks)."""
    rows, table, tricks = [], [], []
    shipped = {r.case.key: r for r in results if r.variant == SHIPPED}
    for r in results:
        if r.variant == SHIPPED:
            more, line = case_rows(r)
            table.append(line)
            if len(results) > len(shipped):
                tricks.append(trick_rows(r, r)[1])
        elif r.case.key in shipped:
            more, line = trick_rows(r, shipped[r.case.key])
            tricks.append(line)
        else:
            continue
        rows += more
    return rows, table, tricks


def case_details(r: Result) -> dict:
    return {
        "case": r.case.key, "variant": r.variant.name or "as shipped",
        "convert_seconds": [round(c.seconds, 3) for c in r.converts], "convert_cpu_seconds": [round(c.cpu_seconds, 1) for c in r.converts],
        "run_seconds": [s.get("seconds") for s in r.summaries], "run_seconds_best": r.summary.get("seconds"),
        "best_convert_seconds": round(r.convert.seconds, 3), "best_cp_seconds": round(r.cp_seconds, 3),
        "cp_seconds": [round(c.seconds, 3) for c in r.cps], "cp_cpu_seconds": [round(c.cpu_seconds, 2) for c in r.cps],
        "cp_maxrss_bytes": [c.maxrss_bytes for c in r.cps], "maxrss_bytes": [c.maxrss_bytes for c in r.converts],
        "vmhwm_bytes": r.summary.get("peak_rss_bytes"), "source_cached_before": r.cached,
        "others_cpu_frac": [c.others_cpu_frac for c in r.converts], "cp_others_cpu_frac": [c.others_cpu_frac for c in r.cps],
        "rss_target": r.targets()[0], "speed_target": r.targets()[1],
    }  # fmt: skip


def print_report(args, session: Session, results: list[Result], method: str, notes: list[str], version: str) -> None:
    rows, table, tricks = report(results)
    if args.json:
        print(json.dumps({"rows": rows, "settings": {"size_gib": args.size_gib, "method": method, "cp": "cp -r --reflink=never",
                                                     "cpus": os.cpu_count(), "vitctl_commit": version, "workdir": str(session.workdir.parent)},
                          "sources": {k: v[1] for k, v in session.built.items()}, "cases": [case_details(r) for r in results],
                          "notes": notes, "failures": session.failures}))  # fmt: skip
        return
    print(f"vitctl convert benchmark (bench/convert.py), checkpoints of >= {args.size_gib:g} GiB, {os.cpu_count()} CPUs, "
          f"workdir {session.workdir.parent}")  # fmt: skip
    print(f"  vitctl: {version or 'unknown commit'}; {' '.join(session.vitctl)}")
    print(f"  method: {method}")
    for k, (_, v) in session.built.items():
        print(f"  source {k}: {v['config']}; {v['tensors']} tensors, largest {v['largest_tensor_bytes'] / MiB:.0f} MiB, "
              f"largest stacked {v['largest_stacked_bytes'] / MiB:.0f} MiB, largest stored unit {v['largest_stored_unit_bytes'] / MiB:.0f} MiB; "
              f"built in {v['build_seconds']:.0f} s")  # fmt: skip
    print()
    B.print_table(
        f"Targets: peak RSS < {RSS_TARGET / MiB:.0f} MiB, throughput >= {SPEED_TARGET}x cp",
        ["case", "source -> target", "GiB", "GiB disk", "conv s", "run s", "CPU s", "GB/s", "cp s", "cp GB/s", "vs cp", "peak RSS MiB",
         "VmHWM MiB", "est. MiB", "src cached", "others CPU", "RSS", "speed"],
        table,
    )  # fmt: skip
    if tricks:
        print()
        B.print_table("Each variant against the code as shipped: seconds (and peak RSS) with it / as shipped",
                      ["case", "variant", "run s", "every run s", "conv s", "CPU s", "peak RSS MiB", "run s x", "CPU s x", "RSS x"],
                      tricks)  # fmt: skip
    print()
    for line in LEGEND:
        print(f"  {line}")
    for n in notes:
        print(f"  note: {n}")
    for f in session.failures:
        print(f"  FAILED {f}")


LEGEND = (
    "GiB: parameter bytes; GiB disk: source files (OCDBT+zstd is compressed). GB/s: source bytes on disk / s.",
    "conv s: the vitctl process, spawn to exit; run s: its conversion alone (--json `seconds`: no interpreter start,",
    "imports or planning). CPU s: user + sys seconds of the vitctl child (all its threads), from os.wait4.",
    "peak RSS: os.wait4 ru_maxrss of the vitctl child; VmHWM / est.: what the converter itself reports / planned.",
    "src cached: source bytes in the page cache before the conversion (fincore); others CPU: other processes' share",
    "of all CPUs during the conversion.",
    "Variants: `at DIR` runs DIR's vitctl (--against); `no X` converts with trick X on its plain path (--tricks; `tune`:",
    "neither mallopt nor gc.disable), `plain` with all of them; run s x > 1: the variant is slower (best of --repeat, interleaved).",
)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = sorted(set(keys) - {c.key for c in CASES})
    if unknown or not keys:
        p.error(f"unknown case(s) {unknown}; choose from {', '.join(c.key for c in CASES)}")
    cases, size = [c for c in CASES if c.key in keys], int(args.size_gib * GiB)
    if size <= 0:
        p.error("--size-gib must be positive")
    workdir = make_workdir(args, cases, size)
    if workdir is None:
        return 2
    session = Session(workdir, size, args, variants(args.tricks, args.against), gate=QuietGate(args.max_wait))
    results = run_cases(cases, session)
    others = f", then once per variant ({', '.join(v.name for v in session.variants[1:])}), in turn" if session.variants[1:] else ""
    notes = [
        session.gate.describe(),
        f"this process's peak RSS: {self_peak_rss() / MiB:.0f} MiB (children are spawned by a small launcher, so it is no floor of theirs)",
        "largest single tensor 64 MiB (one layer's D x F kernel); stacked (L, D, F) sizes per source in `sources`",
    ]
    print_report(args, session, results, METHOD.format(repeat=args.repeat, variants=others), notes, code_version())
    return 0


if __name__ == "__main__":
    sys.exit(main())
