"""Static GPU report, without a GPU: `python -m pyllmops bench static [--out DIR] [--archs 80,90a] [--check]`.

Compiles every CUDA source of the project (the families CMakeLists.txt builds: csrc/<family>/*.cu) with
nvcc and the flags CMakeLists.txt uses, one cubin per file per arch (sm_80, sm_90a), in parallel, and
reports for every kernel instantiation:

  ptxas (-Xptxas -v)   registers, spill stores / loads, stack frame, static shared memory, barriers
  PTX                  threads per block from __launch_bounds__ (.maxntid / .reqntid), dynamic shared
                       memory in use (an `extern __shared__` array)
  a probe compile      the dynamic shared memory the launcher passes, for the kernels in DYNAMIC_SMEM
                       (the launcher's own constexpr expressions, evaluated by the compiler)
  occupancy            resident CTAs and warps per SM from the above (OCCUPANCY_LIMITS, the rules of
                       the CUDA toolkit's cuda_occupancy.h)
  SASS (cuobjdump)     instruction counts: HMMA, LDSM, LDGSTS, 128-bit global loads, LDL/STL, BAR, total

and writes static_report.json (long format: one record per kernel per arch) and static_report.md.
These are static numbers, not measurements. `--check` fails when a hot kernel spills (ptxas spill
stores or loads > 0 bytes). A file that fails to compile is reported (name and first error lines),
the others go on, and the command exits nonzero.

The CUDA 13 toolkit has no cuobjdump / nvdisasm; they are found on PATH, else in Triton's wheel
(triton/backends/nvidia/bin, `pip install triton`); without them the SASS columns read n/a.
No GPU, torch or built extension is needed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---- what is compiled, and how ------------------------------------------------------------------

# The CUDA flags of CMakeLists.txt (target_compile_options of _C, CUDA language), plus -std=c++17
# (CMAKE_CUDA_STANDARD) and the definitions it adds for every CUDA source.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-std=c++17", "-Xcompiler=-fno-fast-math",
              "-Xcompiler=-ffp-contract=off", "-DPYLLMOPS_WITH_CUDA=1"]
DEFAULT_ARCHS = ("80", "90a")
# Folders under csrc/ that hold sources nvcc never sees (the emulated backend's runtime).
NOT_NVCC_DIRS = {"emu"}

# Hot kernels may not spill (--check). A kernel listed here may, with the reason; keys are
# "<family>/<kernel name without template arguments>".
SPILL_ALLOWED: dict[str, str] = {}

# Dynamic shared memory, which only the launch knows: for each kernel the launcher's expression, with
# {0}, {1}, ... standing for the kernel's template arguments. It is evaluated by compiling the .cu
# with a probe appended (host pass only, ~1 s); if an expression no longer compiles (a rename), the
# kernel's dynamic shared memory is reported as 'dynamic' and its occupancy counts static memory only.
DYNAMIC_SMEM = {
    "attention/fwd_kernel": "FwdConfig<{1}, {2}>::kSmemBytes",
    "attention/dq_kernel": "BwdConfig<{1}>::kDqSmemBytes",
    "attention/dkdv_kernel": "BwdConfig<{1}>::kv_smem_bytes({4})",
    "attention/dkdv_dq_kernel": "Fa2BwdConfig<{1}>::kSmemBytes",
    # the largest x tile plan_skinny picks (k_chunk 2048 for one n8 tile, 1024 for two): 32 KB
    "nf4/skinny_mma_kernel": "({1} > 1 ? 1024 : 2048) / kSegK * {1} * kTileSmem",
}


# ---- occupancy ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits that decide how many CTAs are resident. Values: CUDA C++ Programming Guide,
    "Compute capabilities" table (8.0 and 9.0), and the CUDA toolkit's include/cuda_occupancy.h
    (cudaOccMaxBlocksPerSMRegsLimit / SmemLimit / WarpsLimit / BlockBarrierLimit), whose rules
    occupancy() follows."""
    name: str
    regs_per_sm: int = 65536            # 64K 32-bit registers per SM
    reg_alloc_unit: int = 256           # registers are allocated per warp, in units of 256 (8 per thread)
    sub_partitions: int = 4             # registers are split over 4 SM sub-partitions (16K each)
    regs_per_block: int = 65536         # per-CTA register limit
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64          # 2048 threads
    max_ctas_per_sm: int = 32
    max_threads_per_block: int = 1024
    smem_per_sm: int = 0                # the largest shared-memory carveout
    smem_per_block_optin: int = 0       # cudaDevAttrMaxSharedMemoryPerBlockOptin (static + dynamic)
    smem_reserved_per_cta: int = 1024   # reserved by the driver for every CTA (sm_80 and later)
    smem_alloc_unit: int = 128          # shared memory is allocated per CTA in units of 128 bytes
    barriers_per_sm: int = 64           # named barriers: 2 x max CTAs per SM (cuda_occupancy.h)


OCCUPANCY_LIMITS = {
    "80": ArchLimits("sm_80", smem_per_sm=164 * 1024, smem_per_block_optin=163 * 1024),   # A100
    "90": ArchLimits("sm_90", smem_per_sm=228 * 1024, smem_per_block_optin=227 * 1024),   # H100 / H200
}


def limits_for(arch: str) -> ArchLimits:
    """'90a' -> the sm_90 limits (arch-specific features do not change the SM's resources)."""
    key = arch.rstrip("a")
    if key not in OCCUPANCY_LIMITS:
        raise ValueError(f"no occupancy limits for arch {arch!r}; known: {sorted(OCCUPANCY_LIMITS)}")
    return OCCUPANCY_LIMITS[key]


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(lim: ArchLimits, regs: int, threads: int, smem_static: int = 0, smem_dynamic: int = 0,
              barriers: int = 0) -> dict:
    """Resident CTAs and warps per SM of a kernel launched with `threads` per block, as the CUDA
    occupancy calculator counts them. Returns ctas, warps, limiter ('regs', 'smem', 'warps', 'ctas',
    'barriers', joined by '+' on a tie) and each limit; ctas = 0 when one CTA does not fit."""
    warps_per_cta = -(-threads // 32)
    # registers: per warp, rounded up to the allocation unit; warps fit per sub-partition
    regs_per_warp = _round_up(max(regs, 1) * 32, lim.reg_alloc_unit)
    fits = (regs <= lim.max_regs_per_thread
            and regs_per_warp * _round_up(warps_per_cta, lim.sub_partitions) <= lim.regs_per_block)
    warps_by_regs = (lim.regs_per_sm // lim.sub_partitions // regs_per_warp) * lim.sub_partitions
    by = {"regs": warps_by_regs // warps_per_cta if fits else 0}
    # shared memory: static + dynamic + the driver's reserve, rounded to the allocation unit
    smem_cta = _round_up(smem_static + smem_dynamic + lim.smem_reserved_per_cta, lim.smem_alloc_unit)
    by["smem"] = lim.smem_per_sm // smem_cta if smem_cta <= lim.smem_per_block_optin + lim.smem_reserved_per_cta else 0
    by["warps"] = lim.max_warps_per_sm // warps_per_cta if threads <= lim.max_threads_per_block else 0
    by["ctas"] = lim.max_ctas_per_sm
    if barriers:
        by["barriers"] = lim.barriers_per_sm // barriers
    ctas = min(by.values())
    limiter = "+".join(k for k, v in by.items() if v == ctas)
    return {"ctas": ctas, "warps": ctas * warps_per_cta, "limiter": limiter, "by": by,
            "regs_allocated": regs_per_warp // 32, "smem_per_cta": smem_cta}


def warps_by_registers(lim: ArchLimits, regs: int) -> int:
    """Upper bound on resident warps per SM from registers alone (for kernels whose block size is
    set only at launch)."""
    regs_per_warp = _round_up(max(regs, 1) * 32, lim.reg_alloc_unit)
    return min(lim.max_warps_per_sm, (lim.regs_per_sm // lim.sub_partitions // regs_per_warp) * lim.sub_partitions)


# ---- parsers --------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict:
    """ptxas -v output -> {mangled entry name: {arch, regs, barriers, smem, cmem0, stack, spill_stores,
    spill_loads}}. Only entry functions (kernels); properties of non-inlined device functions are
    skipped. Absent fields (ptxas omits zero smem, and cmem on sm_90) are 0."""
    out: dict = {}
    cur = None      # the entry whose 'Used ...' line comes next
    props = None    # the function whose properties line comes next
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = m.group(1)
            out[cur] = {"arch": m.group(2), "regs": None, "barriers": 0, "smem": 0, "cmem0": 0,
                        "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        m = _PROPS.search(line)
        if m:
            props = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and props in out:
            out[props].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m and cur in out:
            rec = out[cur]
            rec["regs"] = int(m.group(1))
            for pat, key in ((r"used (\d+) barriers", "barriers"), (r"(\d+) bytes smem", "smem"),
                             (r"(\d+) bytes cmem\[0\]", "cmem0")):
                mm = re.search(pat, line)
                if mm:
                    rec[key] = int(mm.group(1))
            cur = None
    return out


_PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$.]+)\s*\(", re.M)
_PTX_EXTERN_SHARED = re.compile(r"^\s*\.extern\s+\.shared\s+[^;]*?([\w$]+)\s*\[\s*\]\s*;", re.M)


def parse_ptx(text: str) -> dict:
    """PTX -> {mangled entry name: {maxntid, reqntid, minnctapersm, dynamic_smem}}: the block size a
    __launch_bounds__ declares (product of the .maxntid dims; None without one) and whether the entry
    touches an `extern __shared__` array (then the launch passes dynamic shared memory)."""
    externs = _PTX_EXTERN_SHARED.findall(text)
    starts = list(_PTX_ENTRY.finditer(text))
    out = {}
    for i, m in enumerate(starts):
        body = text[m.end():starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        head = body.split("{", 1)[0]  # parameters and performance directives
        rec = {"maxntid": None, "reqntid": None, "minnctapersm": None}
        for key in ("maxntid", "reqntid"):
            mm = re.search(rf"\.{key}\s+([\d,\s]+)", head)
            if mm:
                prod = 1
                for d in mm.group(1).replace(" ", "").strip(",").split(","):
                    prod *= int(d)
                rec[key] = prod
        mm = re.search(r"\.minnctapersm\s+(\d+)", head)
        if mm:
            rec["minnctapersm"] = int(mm.group(1))
        rec["dynamic_smem"] = any(re.search(rf"\b{re.escape(e)}\b", body) for e in externs)
        out[m.group(1)] = rec
    return out


_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_NVDISASM_FUNC = re.compile(r"^\.text\.(\S+):\s*$")
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")

# SASS instruction classes: name -> predicate on the full opcode (with modifiers).
SASS_CLASSES = {
    "HMMA": lambda op: op.startswith("HMMA"),          # mma.sync tensor-core ops
    "HGMMA": lambda op: op.startswith("HGMMA"),        # wgmma (sm_90a)
    "LDSM": lambda op: op.startswith("LDSM"),          # ldmatrix
    "LDGSTS": lambda op: op.startswith("LDGSTS"),      # cp.async
    "LDG128": lambda op: op.startswith("LDG") and not op.startswith("LDGSTS") and ".128" in op,
    "LDG": lambda op: op.split(".")[0] == "LDG",        # all global loads
    "LDL": lambda op: op.split(".")[0] == "LDL",
    "STL": lambda op: op.split(".")[0] == "STL",
    "BAR": lambda op: op.split(".")[0] == "BAR",
}


def parse_sass(text: str) -> dict:
    """cuobjdump -sass (or nvdisasm) output -> {mangled function: {class: count, 'total': n}}. total
    counts every instruction except NOP padding."""
    out: dict = {}
    cur = None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line) or _NVDISASM_FUNC.match(line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, {k: 0 for k in (*SASS_CLASSES, "total")})
            continue
        if cur is None:
            continue
        m = _SASS_INSTR.match(line)
        if not m:
            continue
        op = m.group(1)
        if op == "NOP":
            continue
        counts = out[cur]
        counts["total"] += 1
        for k, pred in SASS_CLASSES.items():
            if pred(op):
                counts[k] += 1
    return out


_RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):\s*$")


def parse_res_usage(text: str) -> dict:
    """cuobjdump -res-usage -> {mangled function: {REG, STACK, SHARED, LOCAL}} (SHARED includes the
    1 KB system reserve on sm_90, ptxas' smem does not)."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _RES_FUNC.match(line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


# ---- names ----------------------------------------------------------------------------------------

def demangle(names: list[str]) -> dict:
    """Mangled -> demangled, with c++filt (binutils) or cu++filt; names stay as they are without one."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = res.stdout.splitlines()
    if res.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Splits at `sep` outside <>, (), []."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def split_kernel_name(demangled: str) -> tuple[str, str, list[str]]:
    """'void ns::(anonymous namespace)::k<__half, 64>(ns::Params)' -> ('ns::(anonymous namespace)',
    'k', ['__half', '64']): qualifier, base name, template arguments (as the demangler wrote them)."""
    s = demangled.strip()
    if s.startswith("void "):
        s = s[5:]
    # drop the parameter list: the last top-level '(...)'
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        if s[i] == ")":
            depth += 1
        elif s[i] == "(":
            depth -= 1
            if depth == 0:
                s = s[:i]
                break
    targs: list[str] = []
    if s.endswith(">"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ">":
                depth += 1
            elif s[i] == "<":
                depth -= 1
                if depth == 0:
                    targs = _split_top(s[i + 1:-1])
                    s = s[:i]
                    break
    qual, _, base = s.rpartition("::")
    return qual, base, targs


_SHORT_TYPES = {"__half": "f16", "__nv_bfloat16": "bf16", "float": "f32", "unsigned short": "u16",
                "true": "T", "false": "F"}


def short_name(demangled: str) -> str:
    """'void pyllmops::attention::cuda::(anonymous namespace)::fwd_kernel<__nv_bfloat16, 128>(...)'
    -> 'fwd_kernel<bf16,128>'; enum casts '(ns::WeightKind)1' -> 'WeightKind1'."""
    _, base, targs = split_kernel_name(demangled)
    if not targs:
        return base
    short = []
    for a in targs:
        a = _SHORT_TYPES.get(a, a)
        a = re.sub(r"^\((?:[\w]+::)*(\w+)\)(-?\d+)$", r"\1\2", a)
        short.append(a)
    return f"{base}<{','.join(short)}>"


# ---- tools ------------------------------------------------------------------------------------------

def find_sass_tool() -> tuple[str | None, str]:
    """cuobjdump on PATH (a full CUDA toolkit), else Triton's copy; (path, how it was found)."""
    p = shutil.which("cuobjdump")
    if p:
        return p, "PATH"
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if p.exists():
            return str(p), "triton"
    return None, "no cuobjdump on PATH and no triton package (pip install triton)"


def tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else "unknown"


def repo_root(start: Path | None = None) -> Path | None:
    """The source tree: the folder above the package when it holds csrc/ (an editable install or a
    checkout), else the current folder when it does."""
    for cand in ([start] if start else []) + [Path(__file__).resolve().parents[2], Path.cwd()]:
        if cand and (cand / "csrc").is_dir():
            return cand
    return None


def cuda_sources(root: Path) -> list[Path]:
    """The .cu files nvcc compiles: csrc/<family>/*.cu for the families CMakeLists.txt lists (all
    folders but the emulator's when the list cannot be read)."""
    fams = None
    cmake = root / "CMakeLists.txt"
    if cmake.exists():
        m = re.search(r"set\(PYLLMOPS_FAMILIES\s+([^)]*)\)", cmake.read_text())
        if m:
            fams = m.group(1).split()
    files = []
    for d in sorted((root / "csrc").iterdir()):
        if d.is_dir() and d.name not in NOT_NVCC_DIRS and (fams is None or d.name in fams):
            files += sorted(d.glob("*.cu"))
    return files


# ---- compile one file for one arch ------------------------------------------------------------------

def gencode(arch: str) -> str:
    return f"arch=compute_{arch},code=sm_{arch}"


def error_excerpt(log: str, n: int = 12) -> list[str]:
    """The first error lines of a compiler log (with the line after each), else its first lines."""
    lines = log.splitlines()
    idx = [i for i, ln in enumerate(lines) if re.search(r"\berror\b", ln, re.I)]
    if not idx:
        return lines[:n]
    out: list[str] = []
    for i in idx:
        for ln in lines[i:i + 3]:
            if ln not in out[-3:]:
                out.append(ln)
        if len(out) >= n:
            break
    return out[:n]


def compile_one(src: Path, arch: str, workdir: Path, include: Path, nvcc: str = "nvcc",
                defines: tuple[str, ...] = (), sass_tool: str | None = None, timeout: int = 900) -> dict:
    """nvcc -cubin for one arch with -Xptxas -v, keeping the PTX; then the SASS counts. Returns
    {ok, seconds, ptxas, ptx, sass, res_usage, sass_error, error}."""
    t0 = time.time()
    kdir = workdir / f"{src.stem}.{arch}"
    kdir.mkdir(parents=True, exist_ok=True)
    cubin = kdir / f"{src.stem}.cubin"
    cmd = [nvcc, "-cubin", "-gencode", gencode(arch), *NVCC_FLAGS, *defines, f"-I{include}",
           "-Xptxas", "-v", "--keep", "--keep-dir", str(kdir), str(src), "-o", str(cubin)]
    res = {"file": str(src), "arch": arch, "ok": False, "ptxas": {}, "ptx": {}, "sass": None, "res_usage": None,
           "sass_error": None, "error": None}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log = p.stdout + p.stderr
        rc = p.returncode
    except subprocess.TimeoutExpired:
        log, rc = f"nvcc timed out after {timeout} s", -1
    except OSError as e:
        log, rc = f"cannot run nvcc: {e}", -1
    res["seconds_nvcc"] = round(time.time() - t0, 2)
    if rc != 0 or not cubin.exists():
        prefix = f"{include.resolve().parent}/"  # paths relative to the source tree (it may be a temp copy)
        res["error"] = [ln.replace(prefix, "") for ln in error_excerpt(log)] or [f"nvcc exited {rc}"]
        res["seconds"] = res["seconds_nvcc"]
        return res
    res["ok"] = True
    res["ptxas"] = parse_ptxas(log)
    ptx = list(kdir.glob("*.ptx"))
    if ptx:
        res["ptx"] = parse_ptx(ptx[0].read_text())
    if sass_tool:
        try:
            q = subprocess.run([sass_tool, "-sass", "-res-usage", str(cubin)], capture_output=True, text=True,
                               timeout=timeout)
            if q.returncode != 0:
                why = " ".join(error_excerpt(q.stderr + q.stdout, 3))
                res["sass_error"] = f"cuobjdump exited {q.returncode}: {why}"
            else:
                res["sass"] = parse_sass(q.stdout)
                res["res_usage"] = parse_res_usage(q.stdout)
                if not res["sass"]:
                    res["sass_error"] = "cuobjdump printed no SASS for this cubin"
        except (OSError, subprocess.TimeoutExpired) as e:
            res["sass_error"] = f"cuobjdump failed: {e}"
    else:
        res["sass_error"] = "no cuobjdump"
    res["seconds"] = round(time.time() - t0, 2)
    # the cubin and intermediates are not needed any more: keep the temp dir small
    shutil.rmtree(kdir, ignore_errors=True)
    return res


# ---- dynamic shared memory probe --------------------------------------------------------------------

def probe_dynamic_smem(src: Path, items: list[tuple[str, str, str]], workdir: Path, include: Path,
                       nvcc: str = "nvcc", defines: tuple[str, ...] = ()) -> dict:
    """items: (key, qualifier, expression). Compiles `src` + one line per item naming an incomplete
    template specialised on the expression's value; the front end's error message for that line
    carries the value. Returns {key: bytes or None (the expression did not evaluate)}."""
    lines = [f'#include "{src.resolve()}"', "template <long long N> struct PyllmopsStaticProbe;"]
    where = {}
    for i, (key, qual, expr) in enumerate(items):
        opens = closes = ""
        for part in qual.split("::") if qual else []:
            opens += "namespace {" if part == "(anonymous namespace)" else f"namespace {part} {{ "
            closes += "}"
        lines.append(f"{opens} PyllmopsStaticProbe<(long long)({expr})> pyllmops_static_probe_{i}; {closes}")
        where[len(lines)] = key
    probe = workdir / f"probe_{src.stem}.cu"
    probe.write_text("\n".join(lines) + "\n")
    cmd = [nvcc, "--cuda", "-gencode", gencode("80"), *NVCC_FLAGS, *defines, f"-I{include}", str(probe),
           "-o", os.devnull]
    try:
        log = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stderr
    except (OSError, subprocess.TimeoutExpired):
        return {key: None for key, _, _ in items}
    vals = {key: None for key, _, _ in items}
    for m in re.finditer(rf"{re.escape(probe.name)}\((\d+)\): error: incomplete type "
                         r"\"PyllmopsStaticProbe<(-?\d+)[A-Za-z]*>\"", log):
        key = where.get(int(m.group(1)))
        if key is not None:
            vals[key] = int(m.group(2))
    return vals


# ---- the report ---------------------------------------------------------------------------------------

def nvcc_version(nvcc: str = "nvcc") -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else ""


def git_info(root: Path) -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "csrc_dirty": bool(git("status", "--porcelain", "--", "csrc"))}


def build_records(results: list[dict], dyn: dict, root: Path) -> list[dict]:
    """One record per kernel per arch, from the compile results and the dynamic-smem probe values
    ({(family, mangled): (bytes or None, expression)})."""
    names = sorted({k for r in results for k in r["ptxas"]})
    dem = demangle(names)
    records = []
    for r in results:
        if not r["ok"]:
            continue
        src = Path(r["file"])
        family = src.parent.name
        lim = limits_for(r["arch"])
        for mangled, pt in r["ptxas"].items():
            d = dem.get(mangled, mangled)
            _, base, _ = split_kernel_name(d)
            ptx = r["ptx"].get(mangled, {})
            threads = ptx.get("reqntid") or ptx.get("maxntid")
            rec = {
                "family": family, "file": str(src.relative_to(root)) if src.is_relative_to(root) else str(src),
                "arch": f"sm_{r['arch']}", "kernel": short_name(d), "base": f"{family}/{base}",
                "name": d, "mangled": mangled,
                "threads": threads, "threads_from": "__launch_bounds__" if threads else None,
                "regs": pt["regs"], "spill_stores": pt["spill_stores"], "spill_loads": pt["spill_loads"],
                "stack": pt["stack"], "smem_static": pt["smem"], "barriers": pt["barriers"], "cmem0": pt["cmem0"],
                "min_ctas_per_sm": ptx.get("minnctapersm"),
            }
            # dynamic shared memory
            if ptx.get("dynamic_smem"):
                val, expr = dyn.get((family, mangled), (None, DYNAMIC_SMEM.get(rec["base"])))
                rec["smem_dynamic"] = val
                rec["smem_dynamic_from"] = expr if val is not None else (
                    f"not evaluated ({expr})" if expr else "set at launch, not in DYNAMIC_SMEM")
            else:
                rec["smem_dynamic"], rec["smem_dynamic_from"] = 0, "no extern __shared__"
            # occupancy
            rec["occupancy_note"] = ""
            rec["warps_per_sm_max_by_regs"] = None
            if threads and rec["regs"] is not None:
                occ = occupancy(lim, rec["regs"], threads, rec["smem_static"], rec["smem_dynamic"] or 0,
                                rec["barriers"])
                rec.update(ctas_per_sm=occ["ctas"], warps_per_sm=occ["warps"], limiter=occ["limiter"],
                           occupancy_pct=round(100 * occ["warps"] / lim.max_warps_per_sm, 1),
                           regs_allocated=occ["regs_allocated"], smem_per_cta=occ["smem_per_cta"])
                if ptx.get("dynamic_smem") and rec["smem_dynamic"] is None:
                    rec["occupancy_note"] = "static smem only (dynamic smem unknown)"
            else:
                rec.update(ctas_per_sm=None, warps_per_sm=None, limiter=None, occupancy_pct=None,
                           regs_allocated=None, smem_per_cta=None)
                rec["warps_per_sm_max_by_regs"] = warps_by_registers(lim, rec["regs"] or 0)
                rec["occupancy_note"] = "block size set at launch (no __launch_bounds__): warps bound by registers only"
            # SASS
            sass = (r["sass"] or {}).get(mangled)
            if sass:
                rec["sass"] = sass
                rec["sass_error"] = None
            else:
                rec["sass"] = None
                rec["sass_error"] = r["sass_error"] or "function not found in the SASS listing"
            ru = (r["res_usage"] or {}).get(mangled)
            rec["regs_cubin"] = ru.get("REG") if ru else None
            rec["hot"] = rec["base"] not in SPILL_ALLOWED
            records.append(rec)
    # the same kernel name in two files of a family (anonymous namespaces): name the file too
    files_of: dict = {}
    for rec in records:
        files_of.setdefault((rec["family"], rec["kernel"]), set()).add(rec["file"])
    for rec in records:
        if len(files_of[(rec["family"], rec["kernel"])]) > 1:
            rec["kernel"] += f" [{Path(rec['file']).name}]"
    records.sort(key=lambda x: (x["family"], x["base"], natural_key(x["kernel"]), x["arch"]))
    return records


def natural_key(s: str) -> list:
    """'k<f16,64>' sorts before 'k<f16,128>'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def spilling(records: list[dict]) -> list[dict]:
    """Hot kernels with ptxas spill stores or loads."""
    return [r for r in records if r["hot"] and (r["spill_stores"] or r["spill_loads"])]


def _fmt_bytes(n) -> str:
    if n is None:
        return "dynamic"
    return f"{n / 1024:.1f}K" if n >= 1024 else str(n)


def markdown(meta: dict, records: list[dict], failures: list[dict]) -> str:
    L = ["These are static numbers from ptxas and the SASS of the compiled cubins, not measurements: no GPU "
         "ran anything. Occupancy is what the CUDA occupancy rules give for the registers, shared memory and "
         "block size below; it is an upper bound on what a launch achieves.", ""]
    L.append(f"nvcc {meta['nvcc_version']}, archs {', '.join('sm_' + a for a in meta['archs'])}, commit "
             f"{meta['git_commit'][:12]}{' (csrc/ had uncommitted changes)' if meta['csrc_dirty'] else ''}, "
             f"{meta['date']}; SASS: {meta['sass_tool']}; {meta['seconds_total']:.0f} s on {meta['jobs']} "
             f"parallel compiles.")
    L.append("")
    L.append("Regenerate: `python -m pyllmops bench static --ref HEAD` (writes this folder; without --ref: the "
             "working tree); CI: `python -m pyllmops bench static --check --out DIR`.")
    L.append("")
    if failures:
        L.append("**Files that failed to compile:**")
        L.append("")
        for f in failures:
            L.append(f"- `{f['file']}` (sm_{f['arch']}):")
            L.append("  ```")
            L += ["  " + ln for ln in f["error"]]
            L.append("  ```")
        L.append("")
    sp = spilling(records)
    if sp:
        L.append("**Hot kernels that spill:** " + ", ".join(f"`{r['kernel']}` ({r['arch']}: {r['spill_stores']} B "
                                                            f"stores, {r['spill_loads']} B loads)" for r in sp))
    else:
        L.append("**Spills:** no kernel spills to local memory on any arch (ptxas: 0 bytes spill stores / loads)."
                 if not any(r["spill_stores"] or r["spill_loads"] for r in records) else
                 "**Spills:** only allow-listed kernels spill.")
    L.append("")
    L += ["Columns: `thr` threads per block from `__launch_bounds__` ('?' when only the launch sets it); `regs` "
          "as ptxas reports them (allocated in units of 8 per thread); `spill` spill stores/loads bytes; `stack` "
          "stack frame bytes; `smem` static shared memory; `dyn` dynamic shared memory the launcher passes "
          "(evaluated from its constexpr tile config; 'dynamic' = unknown, occupancy then counts static memory "
          "only, marked *); `CTAs`, `warps` resident per SM (+1 KB reserved per CTA; limits: 64K regs, 64 "
          "warps, 32 CTAs, 164 KB (sm_80) / 228 KB (sm_90) shared per SM), `limit` what bounds them; "
          "`≤N` = block size unknown, warps bound by registers alone. SASS counts are static instruction "
          "counts in the code (not executed counts): `LDG128` 128-bit global loads, `LDL/STL` local memory "
          "accesses, `instr` all instructions but NOPs.", ""]
    for family in sorted({r["family"] for r in records}):
        L.append(f"## {family}")
        L.append("")
        L.append("| kernel | arch | thr | regs | spill | stack | smem | dyn | CTAs | warps | limit | HMMA | LDSM | "
                 "LDGSTS | LDG128 | LDL/STL | BAR | instr |")
        L.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|")
        for r in (x for x in records if x["family"] == family):
            s = r["sass"]
            sc = (lambda k: str(s[k])) if s else (lambda k: "n/a")
            if r["ctas_per_sm"] is None:
                ctas, warps, limit = "?", f"≤{r['warps_per_sm_max_by_regs']}", "–"
            else:
                star = "*" if r["occupancy_note"].startswith("static smem only") else ""
                ctas, warps, limit = f"{r['ctas_per_sm']}{star}", f"{r['warps_per_sm']}{star}", r["limiter"]
            spill = f"{r['spill_stores']}/{r['spill_loads']}"
            if r["spill_stores"] or r["spill_loads"]:
                spill = f"**{spill}**"
            L.append("| " + " | ".join([
                f"`{r['kernel']}`", r["arch"].replace("sm_", ""), str(r["threads"] or "?"), str(r["regs"]), spill,
                str(r["stack"]), _fmt_bytes(r["smem_static"]), _fmt_bytes(r["smem_dynamic"]), ctas, warps, limit,
                sc("HMMA") if not (s and s["HGMMA"]) else f"{s['HMMA']}+{s['HGMMA']}wg", sc("LDSM"), sc("LDGSTS"),
                sc("LDG128"), f"{s['LDL']}/{s['STL']}" if s else "n/a", sc("BAR"), sc("total")]) + " |")
        L.append("")
    sass_errs = sorted({(r["file"], r["arch"], r["sass_error"]) for r in records if r["sass"] is None})
    if sass_errs:
        L.append("SASS not available for: " + "; ".join(f"{f} ({a}): {e}" for f, a, e in sass_errs))
        L.append("")
    notes = meta.get("notes") or []
    if notes:
        L.append("Notes:")
        L.append("")
        L += [f"- {n}" for n in notes]
        L.append("")
    return "\n".join(L)


def report_json(meta: dict, failures: list[dict], records: list[dict]) -> str:
    """{"meta", "failures", "records"}; one record per line, so a change of the report diffs by kernel."""
    head = json.dumps({"meta": meta, "failures": failures}, indent=1)[:-2]
    recs = ",\n  ".join(json.dumps(r, separators=(", ", ": ")) for r in records)
    return f"{head},\n \"records\": [\n  {recs}\n ]\n}}\n"


def export_ref(root: Path, ref: str, dest: Path) -> str:
    """Writes csrc/ and CMakeLists.txt of commit `ref` under dest (git archive); returns the commit."""
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", f"{ref}^{{commit}}"], capture_output=True,
                         text=True).stdout.strip()
    if not sha:
        raise ValueError(f"--ref {ref!r} is not a commit of {root}")
    arc = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", sha, "csrc", "CMakeLists.txt"],
                         capture_output=True, check=True).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(arc)) as tf:
        try:
            tf.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(dest)
    return sha


def run(root: Path, out: Path | None, archs: list[str], jobs: int, check: bool, nvcc: str = "nvcc",
        sass: bool = True, ref: str | None = None) -> int:
    """Compiles, analyses and writes the report; returns the exit status (nonzero: a file failed to
    compile, or --check found a hot kernel that spills)."""
    if ref is not None:
        with tempfile.TemporaryDirectory(prefix="pyllmops_static_ref_") as tmp:
            try:
                sha = export_ref(root, ref, Path(tmp))
            except (ValueError, subprocess.CalledProcessError) as e:
                print(f"pyllmops bench static: {e}", file=sys.stderr)
                return 2
            print(f"compiling csrc/ of commit {sha[:12]} ({ref}), not the working tree")
            return _run(Path(tmp), out or root / "benchmarks" / "results" / "static", archs, jobs, check, nvcc, sass,
                        _git={"commit": sha, "csrc_dirty": False})
    return _run(root, out, archs, jobs, check, nvcc, sass)


def _run(root: Path, out: Path | None, archs: list[str], jobs: int, check: bool, nvcc: str, sass: bool,
         _git: dict | None = None) -> int:
    t0 = time.time()
    if shutil.which(nvcc) is None:
        print(f"pyllmops bench static: {nvcc} not found; put the CUDA toolkit's nvcc on PATH", file=sys.stderr)
        return 2
    for a in archs:
        limits_for(a)  # unknown arch: a clear error before compiling anything
    srcs = cuda_sources(root)
    if not srcs:
        print(f"pyllmops bench static: no .cu files under {root / 'csrc'}", file=sys.stderr)
        return 2
    version = nvcc_version(nvcc)
    defines = (f'-DPYLLMOPS_CUDA_ARCHS="{",".join(archs)}"', f'-DPYLLMOPS_CUDA_VERSION="{version}"')
    sass_tool, sass_how = find_sass_tool() if sass else (None, "disabled (--no-sass)")
    include = root / "csrc"
    print(f"compiling {len(srcs)} files x {len(archs)} archs with nvcc {version}, {jobs} at a time; SASS: "
          f"{sass_tool or sass_how}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pyllmops_static_") as tmp:
        work = Path(tmp)
        # largest sources first: the longest compiles start early
        tasks = sorted(((s, a) for s in srcs for a in archs), key=lambda t: -t[0].stat().st_size)
        results = []
        with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
            futs = {ex.submit(compile_one, s, a, work, include, nvcc, defines, sass_tool): (s, a) for s, a in tasks}
            for fut in cf.as_completed(futs):
                r = fut.result()
                results.append(r)
                rel = Path(r["file"]).relative_to(root)
                state = f"{len(r['ptxas'])} kernels" if r["ok"] else "FAILED"
                print(f"  {rel} sm_{r['arch']}: {state} ({r['seconds']:.1f} s)", flush=True)
                if not r["ok"]:
                    print("    " + "\n    ".join(r["error"]), flush=True)
        t_compile = time.time() - t0
        # dynamic shared memory: one probe per file that has kernels listed in DYNAMIC_SMEM
        names = sorted({k for r in results for k in r["ptxas"]})
        dem = demangle(names)
        per_file: dict = {}
        for r in results:
            if not r["ok"]:
                continue
            src = Path(r["file"])
            for mangled in r["ptxas"]:
                if not r["ptx"].get(mangled, {}).get("dynamic_smem"):
                    continue
                qual, base, targs = split_kernel_name(dem.get(mangled, mangled))
                expr = DYNAMIC_SMEM.get(f"{src.parent.name}/{base}")
                if expr is None:
                    continue
                try:
                    e = expr.format(*targs)
                except IndexError:
                    continue
                per_file.setdefault(src, {})[mangled] = (qual, e)
        dyn = {}
        with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
            futs = {ex.submit(probe_dynamic_smem, src, [(m, q, e) for m, (q, e) in items.items()], work, include,
                              nvcc, defines): (src, items) for src, items in per_file.items()}
            for fut in cf.as_completed(futs):
                src, items = futs[fut]
                vals = fut.result()
                for m, (_, e) in items.items():
                    dyn[(src.parent.name, m)] = (vals.get(m), e)
    records = build_records(results, dyn, root)
    failures = [{"file": str(Path(r["file"]).relative_to(root)), "arch": r["arch"], "error": r["error"]}
                for r in results if not r["ok"]]
    total = time.time() - t0
    git = _git or git_info(root)
    notes = [
        "sm_90a cubins carry the 1 KB per-CTA system reserve in their shared-memory sections "
        "(cuobjdump -res-usage SHARED = static + 1024); ptxas' smem excludes it on both archs, and the "
        "occupancy adds it once per CTA.",
        "Register counts are ptxas' (`Used N registers`, identical in the cubins' resource usage); the "
        "hardware allocates them per warp in units of 256, i.e. rounded up to a multiple of 8 per thread.",
    ]
    by_key: dict = {}
    for r in records:
        by_key.setdefault(r["mangled"], {})[r["arch"]] = r
    diffs = sorted(((a["regs"] - b["regs"], a, b) for pair in by_key.values() if len(pair) == 2
                    for a, b in [sorted(pair.values(), key=lambda x: x["arch"])]
                    if a["regs"] is not None and b["regs"] is not None and a["regs"] != b["regs"]),
                   key=lambda t: -abs(t[0]))
    if diffs:
        notes.append("ptxas allocates registers differently per arch; largest differences: " + ", ".join(
            f"{a['kernel']} {a['regs']} ({a['arch']}) vs {b['regs']} ({b['arch']})" for _, a, b in diffs[:6]) + ".")
    mism = [r for r in records if r["regs_cubin"] is not None and r["regs_cubin"] != r["regs"]]
    if mism:
        notes.append("ptxas and the cubin disagree on registers for: " + ", ".join(
            f"{r['kernel']} {r['arch']} ({r['regs']} vs {r['regs_cubin']})" for r in mism))
    meta = {
        "what": "static ptxas / SASS report: not measurements",
        "nvcc_version": version, "archs": archs, "nvcc_flags": NVCC_FLAGS + list(defines),
        "git_commit": git["commit"], "csrc_dirty": git["csrc_dirty"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sass_tool": f"cuobjdump {tool_version(sass_tool)} ({sass_how})" if sass_tool else f"none: {sass_how}",
        "jobs": jobs, "seconds_compile": round(t_compile, 1), "seconds_total": round(total, 1),
        "seconds_per_file": {f"{Path(r['file']).relative_to(root)}:sm_{r['arch']}": r["seconds"] for r in results},
        "occupancy_limits": {k: dataclasses.asdict(v) for k, v in OCCUPANCY_LIMITS.items()},
        "spill_allowed": SPILL_ALLOWED, "dynamic_smem_expressions": DYNAMIC_SMEM, "notes": notes,
    }
    out = out or root / "benchmarks" / "results" / "static"
    out.mkdir(parents=True, exist_ok=True)
    (out / "static_report.json").write_text(report_json(meta, failures, records))
    (out / "static_report.md").write_text(markdown(meta, records, failures))
    n_k = len({r["mangled"] for r in records})
    print(f"{n_k} kernels x {len(archs)} archs; wrote {out}/static_report.json and .md")
    print(f"time: {total:.1f} s ({t_compile:.1f} s compiling, {jobs} jobs)")
    rc = 0
    if failures:
        print(f"FAILED to compile: " + ", ".join(f"{f['file']} (sm_{f['arch']})" for f in failures), file=sys.stderr)
        rc = 1
    sp = spilling(records)
    if sp:
        msg = "\n".join(f"  {r['kernel']} {r['arch']} ({r['file']}): {r['spill_stores']} B spill stores, "
                        f"{r['spill_loads']} B spill loads, {r['regs']} registers" for r in sp)
        if check:
            print("check FAILED: hot kernels spill to local memory (fix them, or add them to SPILL_ALLOWED in "
                  f"pyllmops/bench/static.py with a reason):\n{msg}", file=sys.stderr)
            rc = 1
        else:
            print(f"hot kernels that spill:\n{msg}")
    elif check:
        print("check passed: no hot kernel spills")
    return rc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated, e.g. 80,90a")
    p.add_argument("--check", action="store_true", help="exit nonzero when a hot kernel spills")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--no-sass", action="store_true", help="skip the SASS instruction counts")
    p.add_argument("--ref", default=None, help="compile csrc/ of this commit (e.g. HEAD) instead of the working tree")


def main(args) -> int:
    root = repo_root(Path(args.root) if getattr(args, "root", None) else None)
    if root is None:
        print("pyllmops bench static needs the source tree (csrc/): run it from a checkout", file=sys.stderr)
        return 2
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    jobs = args.jobs or os.cpu_count() or 1
    out = Path(args.out) if args.out else None
    return run(root, out, archs, jobs, args.check, sass=not args.no_sass, ref=args.ref)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m pyllmops.bench.static")
    ap.add_argument("--out", default=None)
    ap.add_argument("--root", default=None)
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
