"""The emulated CUDA backend's own checks (docs/emulator.md); they run only in a PYLLMOPS_CUDA=emu build.

- every detector fires on a deliberately buggy kernel (csrc/emu/selftest.cu);
- the project's kernels give bit-identical outputs under forward, reverse and random thread and block
  order (a kernel whose result depends on the order has a race: a missing barrier);
- negative controls: a wrong mma or ldmatrix layout, or barriers that do nothing, make the attention
  tests fail.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyllmops
from pyllmops._ext import lib

from conftest import EMULATED

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not EMULATED, reason="needs a PYLLMOPS_CUDA=emu build")]
ROOT = Path(__file__).absolute().parent.parent


@pytest.fixture(autouse=True)
def _restore_config():
    before = dict(lib().emu_config())
    yield
    lib().emu_set_config(before["schedule"], before["seed"], list(before["breaks"]), before["arch"])


def _configure(schedule="forward", seed=0, breaks=(), arch=90):
    lib().emu_set_config(schedule, seed, list(breaks), arch)


# ---------------------------------------------------------------- detectors
REPORTS = {
    "early_exit_barrier": r"deadlock in block \(0,0,0\): threads 1-63 wait at __syncthreads \(csrc/emu/selftest\.cu:\d+\); "
                          r"threads 0 have exited",
    "divergent_shuffle": r"deadlock .* warp 0: lanes 0-4,6-31 wait at a __shfl\*_sync \(mask 0xffffffff, "
                         r"csrc/emu/selftest\.cu:\d+\) for lanes 5",
    "mask_without_self": r"__ballot_sync \(csrc/emu/selftest\.cu:\d+\): lane 0 is not in its mask 0xfffffffe",
    "oob_write": r"thread \(31,0,0\): invalid write at address 0x[0-9a-f]+ \(0 bytes past the end of a 128-byte kernel "
                 r"output\)",
    "oob_read": r"thread \(31,0,0\): invalid access at address 0x[0-9a-f]+ \(60 bytes past the end of a 512-byte",
    "oob_write_slack": r"kernel oob_write_slack wrote 0 bytes past the end of a 120-byte kernel output \(inside its "
                       r"alignment slack\)",
    "oob_shared": r"bytes past the end of the dynamic shared memory",
    "misaligned_vector": r"misaligned access: address 0x[0-9a-f]+ of type 'const struct uint4' needs 16-byte alignment "
                         r"\(csrc/emu/selftest\.cu:\d+\)",
    "misaligned_ldmatrix": r"ldmatrix: lane 0 supplies row address 0x[0-9a-f]+, which is not 16-byte aligned",
    "too_many_threads": r"launching too_many_threads \(grid 1x1x1, block 1025x1x1, .*at most 1024 threads per block",
    "grid_y_too_large": r"grid x <= 2\^31 - 1, y and z <= 65535",
    "smem_without_attribute": r"dynamic shared memory above 48 KB needs cudaFuncSetAttribute",
    "smem_over_limit": r"more than 232448 B of shared memory per block on sm_90",
}


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_detector_reports(name):
    with pytest.raises(RuntimeError, match=f"pyllmops emulator: .*{REPORTS[name]}"):
        lib().emu_selftest(name)


def test_collective_mask_mismatch_is_reported_in_every_order():
    """Half a warp shuffles with mask 0xffff, the other half with the full mask: a deadlock (the low half
    ran first and left) or a mismatch (the full mask arrived first), never a silent result."""
    for schedule in ("forward", "reverse", "random"):
        _configure(schedule)
        with pytest.raises(RuntimeError, match=r"deadlock|while lanes 0x[0-9a-f]+ wait at"):
            lib().emu_selftest("mask_mismatch")


def test_sm80_limit():
    _configure(arch=80)
    with pytest.raises(RuntimeError, match=r"more than 166912 B of shared memory per block on sm_80"):
        lib().emu_selftest("smem_over_limit")


def test_shared_memory_starts_as_poison():
    out = torch.tensor(lib().emu_selftest("uninitialized_shared"))
    assert (out[:16] == 2).all() and torch.isnan(out[16:]).all()


def test_dynamic_shared_memory_above_48k_after_the_attribute():
    assert len(lib().emu_selftest("smem_with_attribute")) == 32


def test_cp_async_lands_only_at_its_wait():
    assert torch.isnan(torch.tensor(lib().emu_selftest("cp_async_no_wait"))).all()
    out = torch.tensor(lib().emu_selftest("cp_async_wait"))
    assert torch.equal(out, torch.arange(32) * 4 + 0.5)


def test_missing_barrier_changes_the_result_with_the_order():
    results = {}
    for schedule in ("forward", "reverse"):
        _configure(schedule)
        results[schedule] = (lib().emu_selftest("racy_flag")[0], lib().emu_selftest("racy_flag_fixed")[0])
    assert results["forward"][0] != results["reverse"][0]   # the race is visible
    assert results["forward"][1] == results["reverse"][1] == 1.0  # with the barrier it is gone


def test_ldmatrix_shapes():
    """x1, x2 and x4, plain and transposed, each lane's registers from the ISA's fragment rule."""
    assert lib().emu_selftest("ldmatrix") == [1.0] * 32


def test_prmt_known_selectors():
    assert lib().emu_selftest("prmt") == [1.0] * 5


def test_unemulated_constructs_fail_the_build(tmp_path):
    """A raw __shared__ or an asm outside common/ptx.cuh stops the emulated build at its line."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    cuda_include = pyllmops.build_info()["emu_cuda_include"]  # the headers this build used
    src = tmp_path / "bad.cu"
    src.write_text("#include <cuda_runtime.h>\n__global__ void k(float* p) {\n  __shared__ float s[4];\n"
                   "  unsigned r;\n  asm volatile(\"mov.u32 %0, %%laneid;\" : \"=r\"(r));\n  p[0] = s[0] + r;\n}\n")
    res = subprocess.run([gxx, "-std=c++17", "-x", "c++", "-DPYLLMOPS_EMU=1", f"-I{ROOT / 'csrc/emu/include'}",
                          f"-I{cuda_include}", f"-I{ROOT / 'csrc'}", "-fsyntax-only", str(src)],
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert re.search(r"bad\.cu:3:\d+: error: raw __shared__ is not emulated", res.stderr), res.stderr[-2000:]
    assert re.search(r"bad\.cu:5:\d+: error: inline asm is not emulated", res.stderr), res.stderr[-2000:]


def test_atomics_are_atomic_across_workers():
    assert lib().emu_selftest("atomic_count")[0] == 64 * 128


# ---------------------------------------------------------------- schedule independence of our kernels
def _attention_case():
    q = torch.randn(2, 77, 4, 64).bfloat16().requires_grad_()
    k = torch.randn(2, 77, 2, 64).bfloat16().requires_grad_()
    v = torch.randn(2, 77, 2, 64).bfloat16().requires_grad_()
    g = torch.randn(2, 77, 4, 64).bfloat16()

    def run():
        for t in (q, k, v):
            t.grad = None
        # deterministic: the default backward sums dQ with atomics, whose order a schedule may change
        out = pyllmops.flash_attention(q, k, v, causal=True, window_size=(40, 0), deterministic=True)
        out.backward(g)
        return [out, q.grad, k.grad, v.grad]
    return run


def _varlen_case():
    cu = torch.tensor([0, 5, 70, 133], dtype=torch.int32)
    q = torch.randn(133, 4, 128).half()
    k = torch.randn(133, 4, 128).half()

    def run():
        return list(pyllmops.flash_attention_varlen(q, k, k, cu, cu, 65, 65, return_lse=True))
    return run


def _paged_case():
    kc = torch.randn(20, 16, 2, 64).bfloat16()
    vc = torch.randn(20, 16, 2, 64).bfloat16()
    bt = torch.randperm(20)[:18].view(2, 9).int()
    sl = torch.tensor([130, 77], dtype=torch.int32)
    q1 = torch.randn(2, 8, 64).bfloat16()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q5 = torch.randn(12, 8, 64).bfloat16()

    def run():
        return [pyllmops.paged_attention(q1, kc, vc, bt, sl, num_splits=3),
                pyllmops.paged_attention(q5, kc, vc, bt, sl, cu_seqlens_q=cu, max_seqlen_q=7)]
    return run


def _nf4_case():
    w = torch.randn(96, 128).bfloat16()
    x = torch.randn(3, 128).bfloat16()

    def run():
        packed, state = pyllmops.quantize_nf4(w, blocksize=64, double_quant=True)
        return [packed, pyllmops.dequantize_nf4(packed, state), pyllmops.nf4_linear(x, packed, state)]
    return run


def _lora_case(tensor_cores):
    x = torch.randn(70, 96).bfloat16().requires_grad_()
    w = torch.randn(80, 96).bfloat16() / 10
    a = (torch.randn(8, 96) / 10).bfloat16().requires_grad_()
    b = (torch.randn(80, 8) / 10).bfloat16().requires_grad_()
    g = torch.randn(70, 80).bfloat16()

    def run():
        for t in (x, a, b):
            t.grad = None
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYLLMOPS_LORA_TENSOR_CORES", "1" if tensor_cores else "0")
            mp.setenv("PYLLMOPS_LORA_PATH", "fused")  # 70 rows would take the workspace path (ops/lora.py)
            y = pyllmops.lora_linear(x, w, a, b, 2.0)
            y.backward(g)
        return [y, x.grad, a.grad, b.grad]
    return run


CASES = {"attention": _attention_case, "varlen": _varlen_case, "paged": _paged_case, "nf4": _nf4_case,
         "lora_simt": lambda: _lora_case(False), "lora_mma": lambda: _lora_case(True)}


@pytest.mark.parametrize("family", sorted(CASES))
def test_outputs_do_not_depend_on_the_schedule(family):
    run = CASES[family]()
    results = {}
    for schedule, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        _configure(schedule, seed)
        results[(schedule, seed)] = [t.detach().clone() for t in run()]
    base = results[("forward", 0)]
    assert all(not t.is_floating_point() or not torch.isnan(t).all() for t in base)
    for key, outs in results.items():
        for i, (o, b) in enumerate(zip(outs, base)):
            assert torch.equal(o.view(torch.uint8), b.view(torch.uint8)), f"{family}: output {i} differs under {key}"


# ---------------------------------------------------------------- negative controls
@pytest.mark.parametrize("broken", ["mma", "ldmatrix", "barrier"])
def test_negative_control_breaks_attention_tests(broken):
    """With the emulated instruction broken, the attention tests must fail (else they could not catch it)."""
    env = dict(os.environ, PYLLMOPS_EMU_BREAK=broken, COLUMNS="400")  # untruncated failure lines
    tests = ["tests/test_attention.py", "-k", "test_shapes or test_gqa"]
    if broken == "mma":  # the LoRA tensor-core kernel is the other user of mma.sync
        tests = ["tests/test_attention.py", "tests/test_lora.py", "-k", "test_shapes or test_gqa or tensor_core"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rf", *tests]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:]
    assert res.returncode != 0, f"the tests passed with a broken {broken}: {summary}"
    assert re.search(r"\d+ failed", summary), summary
    # Failed on a wrong result (an assertion against the float64 reference: an error bound, or NaN from
    # poisoned shared memory), not on an error the emulator raised.
    failures = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert failures and all("AssertionError" in line for line in failures), "\n".join(failures[:5])
    if broken == "mma":
        assert any("tensor_core" in line for line in failures), "the LoRA tensor-core kernel did not notice"
