"""The benchmark harness every op family shares.

A family's bench module (pyllmops/bench/<family>.py) defines `run(bench)` and calls
`bench.measure(kernel, provider, mode, x, fn, bytes=..., flops=...)` once per (case, provider); the
harness times it, converts to GB/s or TFLOP/s, relates it to the device's measured ceilings and to
the baseline provider of the same case, and writes one long-format table:
  kernel, provider, mode, x, median_ms, p20_ms, p80_ms, gbps, tflops, bound, pct_of_ceiling,
  vs_baseline, noisy
plus the run's metadata (device, commit, date, torch, CUDA, threads, ceilings) to <out>/<family>.json
and .md (always both; `python -m pyllmops bench` writes them under ./bench-results by default).

What a reader can trust:
- vs_baseline is a speedup: baseline median / this median, > 1 is faster than the case's baseline row.
- bound / pct_of_ceiling: each row is held to the ceiling that bounds it. With bytes B and flops F, the
  ideal time is max(B / copy bandwidth, F / matmul throughput); the larger term names the bound
  ("memory" or "compute") and pct_of_ceiling = 100 * ideal / median. A row faster than that ideal
  (its working set sits in cache, or the ceiling was measured low) gets no percentage and
  above_ceiling = True: a share above 100% is never printed.
- noisy: p80 / p20 > NOISY_SPREAD (1.5); such rows are flagged, not hidden.
- Progress: one line per measured row on stderr (row number, elapsed time), so long runs show life.

Timing. CUDA: triton.testing.do_bench when triton is importable (warm-up, L2 flushed before each
run, CUDA-event timing), else the same procedure here. CPU: perf_counter over repeated calls after
a warm-up; measure_together() alternates the providers of a case call by call, so load drift on a
shared machine does not favour whichever ran in the quieter moment. Both report the median and the
20th/80th percentiles.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyllmops

NOISY_SPREAD = 1.5  # p80 / p20 above this flags a row as noisy
DEFAULT_OUT = "bench-results"  # under the current directory
LEGEND = ("vs baseline is a speedup over the case's baseline row: > 1 is faster, < 1 slower. "
          "% ceiling: the share of the ceiling that bounds the row (memory: copy bandwidth; compute: matmul "
          "throughput); blank with '>ceil' when the row beats the measured ceiling (cache-resident). "
          f"noisy: p80/p20 > {NOISY_SPREAD}.")


def _quantiles(samples):
    s = sorted(samples)
    pick = (lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))])
    return statistics.median(s), pick(0.2), pick(0.8)


def time_cuda(fn, warmup_ms=25, rep_ms=100):
    """-> (median, p20, p80) in ms, L2 flushed before every run."""
    try:
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    except ImportError:
        pass
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / est)), max(5, min(1000, int(rep_ms / est)))
    for _ in range(n_warm):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_rep)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in events])


def time_cpu(fn, warmup=2, min_time_s=0.3, max_reps=50):
    """-> (median, p20, p80) in ms."""
    for _ in range(warmup):
        fn()
    samples, total = [], 0.0
    while len(samples) < 3 or (total < min_time_s and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3)
        total += dt
    return _quantiles(samples)


def git_commit():
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def device_slug(device):
    return "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")


class Bench:
    def __init__(self, family, device, quick=False, timer=None, progress=True):
        self.family, self.device, self.quick = family, torch.device(device), quick
        self.rows = []
        self.progress = progress
        self._t0 = time.perf_counter()
        self._ceilings = None
        self._timer = timer
        self.meta = {
            "family": family,
            "device": device_name(self.device),
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "pyllmops": pyllmops.__version__,
            "build": pyllmops.build_info(),
            "threads": torch.get_num_threads(),
            "quick": quick,
        }

    # ---- timing -------------------------------------------------------------------------------
    def time(self, fn):
        if self._timer is not None:
            return self._timer(fn)
        return self._time_on_device(fn)

    def _time_on_device(self, fn):
        if self.device.type == "cuda":
            return time_cuda(fn)
        return time_cpu(fn, min_time_s=0.1 if self.quick else 0.3)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- ceilings -----------------------------------------------------------------------------
    def ceilings(self):
        """Measured once per run: large device copy (GB/s, bytes read + written) and a large matmul
        (TFLOP/s; bf16 8192^3 on CUDA, fp32 on CPU where bf16 is not a fast path)."""
        if self._ceilings is None:
            dev = self.device
            if dev.type == "cuda":
                n_bytes, mm_n, mm_dtype = 1 << 30, 8192, torch.bfloat16
            else:
                n_bytes, mm_n, mm_dtype = (64 << 20) if self.quick else (256 << 20), 1024 if self.quick else 2048, \
                    torch.float32
            src = torch.empty(n_bytes, dtype=torch.uint8, device=dev).random_(0, 255)
            dst = torch.empty_like(src)
            # timed here whatever timer the rows use (a family that times its providers itself hands the
            # harness a timer returning that case's time; the ceilings taken through it were that time)
            t_copy = self._time_on_device(lambda: dst.copy_(src))[0]
            a = torch.randn(mm_n, mm_n, dtype=mm_dtype, device=dev)
            b = torch.randn(mm_n, mm_n, dtype=mm_dtype, device=dev)
            t_mm = self._time_on_device(lambda: a @ b)[0]
            self._ceilings = {
                "copy_gbps": 2 * n_bytes / (t_copy * 1e-3) / 1e9,
                "matmul_tflops": 2 * mm_n ** 3 / (t_mm * 1e-3) / 1e12,
                "matmul": f"{str(mm_dtype).replace('torch.', '')} {mm_n}^3",
            }
            del src, dst, a, b
            self.meta["ceilings"] = self._ceilings
        return self._ceilings

    # ---- measuring ----------------------------------------------------------------------------
    def measure(self, kernel, provider, mode, x, fn, *, bytes=None, flops=None, baseline=False):
        """Times fn and records a row. bytes: bytes moved (each read or written once) -> GB/s;
        flops -> TFLOP/s. The case's `baseline=True` provider is what vs_baseline divides by."""
        try:
            fn()
            self.sync()
            med, p20, p80 = self.time(fn)
        except Exception as e:  # a peer that cannot run this case: recorded, not fatal
            row = dict(kernel=kernel, provider=provider, mode=mode, x=x, error=f"{type(e).__name__}: {e}")
            self.rows.append(row)
            self._progress(row)
            return None
        row = dict(kernel=kernel, provider=provider, mode=mode, x=x, median_ms=med, p20_ms=p20, p80_ms=p80,
                   gbps=None, tflops=None, baseline=baseline)
        self.rate(row, bytes=bytes, flops=flops)
        self.rows.append(row)
        self._progress(row)
        return row

    def measure_together(self, kernel, mode, x, entries):
        """Times several providers of one case and records a row each. entries: dicts with provider, fn
        and optional bytes, flops, baseline. On the CPU their calls alternate round by round, each round
        starting one provider later (A, B, C, B, C, A, C, A, B, ...), so load that comes and goes on a shared
        machine hits every provider alike and no provider always runs right after the same other one; on CUDA
        (or with a custom timer) each is timed in turn as by measure()."""
        if self._timer is not None or self.device.type == "cuda":
            return [self.measure(kernel, e["provider"], mode, x, e["fn"], bytes=e.get("bytes"),
                                 flops=e.get("flops"), baseline=e.get("baseline", False)) for e in entries]
        ready = []
        for e in entries:
            try:
                for _ in range(2):  # warm-up
                    e["fn"]()
                ready.append(e)
            except Exception as ex:  # a peer that cannot run this case: recorded, not fatal
                row = dict(kernel=kernel, provider=e["provider"], mode=mode, x=x, error=f"{type(ex).__name__}: {ex}")
                self.rows.append(row)
                self._progress(row)
        samples = [[] for _ in ready]
        n = len(ready)
        total, min_time, max_rounds = 0.0, (0.1 if self.quick else 0.3) * n, 50
        rounds = 0
        # Round i starts at provider i mod n (A B C, B C A, C A B, ...) and the run ends on a whole cycle, so every
        # provider is timed equally often in every position: a call right after another provider's (whose memory,
        # caches and allocator state it inherits) was measured 3% slower than the same call first in its round.
        while ready and (rounds < 5 or (total < min_time and rounds < max_rounds) or rounds % n):
            for j in range(n):
                i = (rounds + j) % n
                t0 = time.perf_counter()
                ready[i]["fn"]()
                dt = time.perf_counter() - t0
                samples[i].append(dt * 1e3)
                total += dt
            rounds += 1
        rows = []
        for e, ms in zip(ready, samples):
            med, p20, p80 = _quantiles(ms)
            row = dict(kernel=kernel, provider=e["provider"], mode=mode, x=x, median_ms=med, p20_ms=p20, p80_ms=p80,
                       gbps=None, tflops=None, baseline=e.get("baseline", False))
            self.rate(row, bytes=e.get("bytes"), flops=e.get("flops"))
            self.rows.append(row)
            self._progress(row)
            rows.append(row)
        return rows

    def record(self, kernel, provider, mode, x, median_ms, p20_ms, p80_ms, *, baseline=False, **extra):
        """Adds a row timed by the caller (e.g. a whole training step); extra keys go into the JSON."""
        row = dict(kernel=kernel, provider=provider, mode=mode, x=x, median_ms=median_ms, p20_ms=p20_ms,
                   p80_ms=p80_ms, gbps=None, tflops=None, baseline=baseline, **extra)
        self.rate(row)
        self.rows.append(row)
        self._progress(row)
        return row

    def rate(self, row, bytes=None, flops=None):
        """Fills gbps / tflops, the bound, pct_of_ceiling (never above 100) and the noise flag."""
        med = row["median_ms"]
        row.update(bound=None, pct_of_ceiling=None, above_ceiling=False,
                   noisy=row["p20_ms"] > 0 and row["p80_ms"] / row["p20_ms"] > NOISY_SPREAD)
        if bytes is None and flops is None:
            return row
        ceil = self.ceilings()
        ideal = {}
        if bytes is not None:
            row["gbps"] = bytes / (med * 1e-3) / 1e9
            ideal["memory"] = bytes / (ceil["copy_gbps"] * 1e9)
        if flops is not None:
            row["tflops"] = flops / (med * 1e-3) / 1e12
            ideal["compute"] = flops / (ceil["matmul_tflops"] * 1e12)
        bound = max(ideal, key=ideal.get)
        pct = 100 * ideal[bound] / (med * 1e-3)
        row["bound"] = bound
        if pct > 100:
            row["above_ceiling"] = True
        else:
            row["pct_of_ceiling"] = pct
        return row

    def _progress(self, row):
        if not self.progress:
            return
        what = (f"{row['median_ms']:.4g} ms" if "median_ms" in row else f"n/a ({row['error'][:60]})")
        print(f"[{self.family} #{len(self.rows)} {time.perf_counter() - self._t0:6.1f}s] {row['kernel']} "
              f"{row['mode']} {row['x']} {row['provider']}: {what}", file=sys.stderr, flush=True)

    def _finish(self):
        """vs_baseline = baseline median / this median (> 1: faster than the baseline)."""
        for row in self.rows:
            if "median_ms" not in row:
                continue
            base = [r for r in self.rows if r.get("baseline") and "median_ms" in r and
                    (r["kernel"], r["mode"], r["x"]) == (row["kernel"], row["mode"], row["x"])]
            row["vs_baseline"] = base[0]["median_ms"] / row["median_ms"] if base else None

    # ---- output -------------------------------------------------------------------------------
    def markdown(self):
        self._finish()
        lines = [
            f"# {self.family} on {self.meta['device']}",
            "",
            f"commit {self.meta['commit']}, {self.meta['date']}, torch {self.meta['torch']}, "
            f"CUDA {self.meta['cuda']}, pyllmops {self.meta['pyllmops']}, threads {self.meta['threads']}",
        ]
        if self._ceilings is not None:
            c = self._ceilings
            lines.append(f"ceilings (measured): copy {c['copy_gbps']:.1f} GB/s, matmul {c['matmul_tflops']:.3g} "
                         f"TFLOP/s ({c['matmul']})")
        lines += [
            "",
            LEGEND,
            "",
            "| kernel | mode | x | provider | median ms | p20 | p80 | GB/s | TFLOP/s | bound | % ceiling "
            "| vs baseline (>1 is faster) | noisy | note |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
        ]
        fmt = (lambda v, f: "" if v is None else format(v, f))
        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['kernel']} | {r['mode']} | {r['x']} | {r['provider']} | n/a: {r['error'][:80]} "
                             f"| | | | | | | | | |")
                continue
            pct = ">ceil" if r.get("above_ceiling") else fmt(r.get("pct_of_ceiling"), ".1f")
            vs = r.get("vs_baseline")
            lines.append(
                f"| {r['kernel']} | {r['mode']} | {r['x']} | {r['provider']}{' (baseline)' if r['baseline'] else ''} "
                f"| {r['median_ms']:.4f} | {r['p20_ms']:.4f} | {r['p80_ms']:.4f} | {fmt(r['gbps'], '.1f')} "
                f"| {fmt(r['tflops'], '.3g')} | {r.get('bound') or ''} | {pct} "
                f"| {'' if vs is None else format(vs, '.2f') + 'x'} | {'noisy' if r.get('noisy') else ''} "
                f"| {r.get('note', '')} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir):
        self._finish()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{self.family}.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        (out / f"{self.family}.md").write_text(self.markdown())
        return out
