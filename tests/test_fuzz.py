"""The fuzz and property suite (docs/errors.md): every case of tests/fuzz (malformed dtypes, ranks, sizes,
strides, devices, metadata and values against every public op; hypothesis properties) runs in a worker
subprocess with a per-case watchdog, and each case is one test here: a wrong result, an unclear error, a
crash (the worker died) or a hang (no answer within the timeout) fails that case by name, and the run goes on
in a fresh worker.

Profiles: quick (default, CI): every case once with one seed. Long: PYLLMOPS_FUZZ_SEEDS=N runs every case
with N seeds (fresh random inputs each) and PYLLMOPS_FUZZ_EXAMPLES=M gives each hypothesis property M
examples (default 20), e.g. PYLLMOPS_FUZZ_SEEDS=20 PYLLMOPS_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py.
PYLLMOPS_FUZZ_TIMEOUT (seconds per case, default 10; a property's grows with its examples) is the watchdog;
PYLLMOPS_FUZZ_SEED fixes the base seed.
Reproduce one case: python tests/fuzz/worker.py --run NAME SEED.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import EMULATED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "fuzz", "worker.py")
TIMEOUT = float(os.environ.get("PYLLMOPS_FUZZ_TIMEOUT", "10"))
SEEDS = int(os.environ.get("PYLLMOPS_FUZZ_SEEDS", "1"))
BASE_SEED = int(os.environ.get("PYLLMOPS_FUZZ_SEED", str(int(time.time()) % 100000)))

pytestmark = pytest.mark.skipif(EMULATED, reason="the fuzz suite runs against the CPU build")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def case_names():
    out = subprocess.run([sys.executable, WORKER, "--list"], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"listing the fuzz cases failed:\n{out.stderr[-4000:]}")
    return out.stdout.split()


def run_cases(names, seed, timeout=TIMEOUT):
    """{name: (ok, message)} for every name, from the worker's supervisor (tests/fuzz/worker.py): each case in a
    forked child with a watchdog; hangs and crashes are reported by the supervisor under the case's name."""
    proc = subprocess.run([sys.executable, WORKER, "--serve", str(seed), str(timeout)], input="\n".join(names),
                          capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=600 + timeout * max(1, len(names)) / 10)
    results = {}
    for line in proc.stdout.splitlines():
        msg = json.loads(line)
        results[msg["done"]] = (msg["ok"], msg["error"])
    for name in names:
        results.setdefault(name, (False, f"no result: the supervisor exited with {proc.returncode}\n"
                                         f"{proc.stderr[-3000:]}"))
    return results


_RESULTS = {}


def results_for(seed_index, session):
    """Runs, on first use, every case of this seed that the session selected (all of them, or a -k subset)."""
    if seed_index not in _RESULTS:
        names = [item.callspec.params["name"] for item in session.items
                 if item.originalname == "test_fuzz_case" and item.callspec.params["seed_index"] == seed_index]
        _RESULTS[seed_index] = run_cases(names, BASE_SEED + seed_index)
    return _RESULTS[seed_index]


ALL = case_names() if not EMULATED else []


@pytest.mark.parametrize("seed_index", range(SEEDS))
@pytest.mark.parametrize("name", ALL)
def test_fuzz_case(name, seed_index, request):
    ok, err = results_for(seed_index, request.session)[name]
    assert ok, f"{name} (seed {BASE_SEED + seed_index}; rerun: python tests/fuzz/worker.py --run {name} " \
               f"{BASE_SEED + seed_index}): {err}"


def test_driver_reports_crash_and_hang_by_name():
    """Negative control of the driver: a case that kills its process and one that never returns are reported
    by name, and the cases after them still run."""
    res = run_cases(["control/crash", "control/hang", "control/ok", "control/fail"], BASE_SEED, timeout=3)
    assert res["control/crash"][0] is False and res["control/crash"][1].startswith("CRASH"), res
    assert res["control/hang"][0] is False and res["control/hang"][1].startswith("HANG"), res
    assert res["control/ok"] == (True, ""), res
    assert res["control/fail"][0] is False and "Bad" in res["control/fail"][1], res
