"""Flash attention (forward, backward, varlen, SDPA drop-in, module) against float64 references."""
import math

import pytest
import torch

import pyllmops
from pyllmops.nn.functional import scaled_dot_product_attention
from pyllmops.ops._common import poison_outputs
from pyllmops.ops._common import on_cuda
from pyllmops.reference import attention as ref
from tests.conftest import CUDA, CUDA_MARKS, assert_close, devices, rel_err

# Tolerances (relative Frobenius error vs float64), a few times what a correct kernel shows. Measured on
# the CPU kernel (max over 3 seeds of seqlen 129-300 cases): fp32 out 1.6e-7, lse 5e-8, grads 4.9e-7;
# bf16 out 1.7e-3, grads 1.9e-3; fp16 out 2.1e-4, grads 2.4e-4 (dominated by rounding out / grads to the
# 16-bit type). The GPU kernel also rounds P to 16 bits before P V, hence the fp16 margin. Full and causal
# attention on CPU run torch's CPU flash kernel (ops/attention.py, "torch SDPA for what it computes faster"):
# max over 6 seeds: bf16 out 2.2e-3, grads 3.9e-3, lse 1.1e-5 (its 16-bit path is less exact in the lse than ours,
# 5e-8; still 300x below bf16's epsilon); fp16 out 2.8e-4, grads 4.9e-4, lse 1.1e-5; fp32 as ours.
# fp32 out: a single query over 300 keys (test_shapes' (1, 300): 8 rows in all, so the norm-wise error varies most)
# measured median 3.1e-7, max 8.7e-7 over 300 seeds on this release's kernel and the same (3.1e-7 / 8.6e-7) on the
# previous one, and a fresh-clone CI run drew 1.07e-6: the bound is 3e-6, three times the tail, as the grads' is.
TOL = {torch.float32: {"out": 3e-6, "grad": 3e-6, "lse": 1e-6},
       torch.bfloat16: {"out": 6e-3, "grad": 8e-3, "lse": 3e-5},
       torch.float16: {"out": 2e-3, "grad": 3e-3, "lse": 3e-5}}


@pytest.fixture(params=["auto", "kernel"])
def cpu_path(request, monkeypatch, device):
    """CPU: 'auto' hands full / causal-aligned attention to torch's CPU flash kernel (ops/attention.py), 'kernel'
    forces pyllmops' own kernel (PYLLMOPS_ATTENTION_CPU=kernel), so both are tested. CUDA has one path."""
    if request.param == "kernel" and on_cuda(device):
        pytest.skip("one path on CUDA")
    monkeypatch.setenv("PYLLMOPS_ATTENTION_CPU", request.param)
    return request.param


def _dtypes(device):
    return [torch.float16, torch.bfloat16] if on_cuda(device) else [torch.float32, torch.bfloat16, torch.float16]


def _inputs(b, sq, sk, hq, hkv, d, dtype, device):
    q = torch.randn(b, sq, hq, d, device=device).to(dtype)
    k = torch.randn(b, sk, hkv, d, device=device).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=device).to(dtype)
    return q, k, v


def _check(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None, grads=True, softcap=0.0):
    """Runs pyllmops' forward (+ backward) and the float64 reference; compares out, lse, dq, dk, dv."""
    dtype = q.dtype
    tol = TOL[dtype]
    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    kw = {"softcap": softcap} if softcap else {}
    out, lse = pyllmops.flash_attention(qs, ks, vs, causal=causal, window_size=window_size,
                                        softmax_scale=softmax_scale, return_lse=True, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    ro, rl = ref.attention(q64, k64, v64, causal, window_size, softmax_scale, softcap=softcap)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_close(out, ro, tol["out"], "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "lse: -inf rows differ from the reference"
    fin = torch.isfinite(rl)
    if fin.any():
        assert_close(lse[fin], rl[fin], tol["lse"], "lse")
    empty_rows = torch.isinf(rl)  # (b, h, sq) queries that see no key: out exactly 0
    if empty_rows.any():
        assert (out.transpose(1, 2)[empty_rows] == 0).all()
    if not grads:
        return out
    g = torch.randn_like(out)
    out.backward(g)
    ro.backward(g.double())
    for name, a, r in (("dq", qs.grad, q64.grad), ("dk", ks.grad, k64.grad), ("dv", vs.grad, v64.grad)):
        assert a.dtype == dtype and a.shape == r.shape
        assert not torch.isnan(a).any(), f"{name} has NaN"
        if r.abs().max() == 0:  # e.g. dq with one key: softmax is constant; only rounding noise remains
            assert a.double().norm() <= tol["grad"] * g.double().norm(), f"{name} must be ~zero"
        else:
            assert_close(a, r, tol["grad"], name)
    return out


# ---- forward + backward -----------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (129, 129), (17, 129), (129, 17), (1, 300), (300, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_shapes(device, cpu_path, sq, sk, causal):
    for dtype in _dtypes(device):
        q, k, v = _inputs(2, sq, sk, 4, 2, 64, dtype, device)
        _check(q, k, v, causal=causal)


@pytest.mark.parametrize("case,fwd,bwd", [
    ("full", "pyllmops", "pyllmops"), ("full bf16", "torch", "torch"), ("causal", "pyllmops", "pyllmops"),
    ("causal bf16", "torch", "torch"), ("causal bottom-right sq != sk", "pyllmops", "pyllmops"),
    ("window", "pyllmops", "pyllmops"), ("softcap", "pyllmops", "pyllmops"), ("nan in v", "pyllmops", "pyllmops"),
    ("full, 4 threads: two-pass backward", "pyllmops", "torch"), ("full bf16, forced kernel", "pyllmops", "pyllmops")])
def test_cpu_route_counts(monkeypatch, case, fwd, bwd):
    """ops.attention.route_counts (what `bench attention` prints per row) records the kernel each CPU call ran, as
    docs/attention.md's route table says: torch's CPU flash kernel for bf16 / fp16 without a window and for a float32
    backward that would take the two passes (2 (sequence, kv head) tasks < 4 threads), ours for every other float32
    call (the single-pass backward: 2 tasks >= 1 thread), windows, softcap, bottom-right masks and non-finite
    inputs."""
    from pyllmops.ops.attention import route_counts
    monkeypatch.setenv("PYLLMOPS_NUM_THREADS", "4" if "4 threads" in case else "1")
    if "forced" in case:
        monkeypatch.setenv("PYLLMOPS_ATTENTION_CPU", "kernel")
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    q, k, v = _inputs(2, 40, 56 if "sq != sk" in case else 40, 4, 1, 64, dtype, "cpu")
    if "nan" in case:
        v[1, 3, 0, 5] = float("nan")
    kw = dict(causal=case.startswith("causal"), window_size=(8, 0) if case == "window" else (-1, -1),
              softcap=20.0 if case == "softcap" else 0.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    route_counts.clear()
    out = pyllmops.flash_attention(q, k, v, **kw)
    assert dict(route_counts) == {("fwd", fwd): 1}
    route_counts.clear()
    out.backward(torch.randn_like(out))
    assert dict(route_counts) == {("bwd", bwd): 1}


@pytest.mark.parametrize("device", devices())
def test_seqlen_1000(device):
    dtype = _dtypes(device)[0]
    q, k, v = _inputs(1, 1000, 1000, 2, 1, 64, dtype, device)
    _check(q, k, v, causal=True)
    q, k, v = _inputs(1, 1000, 1000, 2, 2, 32, dtype, device)
    _check(q, k, v, window_size=(100, 37))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("group", [1, 2, 8])
def test_gqa(device, cpu_path, group):
    for dtype in _dtypes(device):
        q, k, v = _inputs(2, 77, 93, 8, 8 // group, 64, dtype, device)
        _check(q, k, v, causal=group == 2, window_size=(-1, -1) if group != 8 else (20, 5))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("head_dim", [8, 24, 64, 72, 128, 256])
def test_head_dims(device, cpu_path, head_dim):
    for dtype in _dtypes(device):
        q, k, v = _inputs(1, 70, 65, 2, 1, head_dim, dtype, device)
        _check(q, k, v, causal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sq,sk,window", [
    (150, 150, (16, 0)), (150, 150, (0, 16)), (150, 150, (7, 23)), (130, 70, (5, 3)),
    (70, 130, (0, 0)), (100, 100, (64, 64)), (90, 200, (-1, 10)), (200, 90, (10, -1)),
    (129, 17, (0, 0)),   # rows 0..111 see no key (bottom-right alignment)
    (64, 200, (3, 0)),
])
def test_windows(device, sq, sk, window):
    for dtype in _dtypes(device):
        q, k, v = _inputs(2, sq, sk, 4, 2, 64, dtype, device)
        _check(q, k, v, window_size=window)
    q, k, v = _inputs(1, sq, sk, 2, 1, 64, _dtypes(device)[0], device)
    _check(q, k, v, causal=True, window_size=window)  # causal sets right = 0


@pytest.mark.parametrize("device", devices())
def test_rows_that_see_nothing(device):
    """Causal with seqlen_q > seqlen_k: the first sq - sk queries see no key: out 0, lse -inf, zero grads."""
    dtype = _dtypes(device)[0]
    q, k, v = _inputs(1, 100, 20, 2, 2, 64, dtype, device)
    q.requires_grad_(True)
    out, lse = pyllmops.flash_attention(q, k, v, causal=True, return_lse=True)
    assert (out[:, :80] == 0).all() and torch.isinf(lse[..., :80]).all() and (lse[..., :80] < 0).all()
    assert torch.isfinite(lse[..., 80:]).all()
    out.sum().backward()
    assert (q.grad[:, :80] == 0).all() and not torch.isnan(q.grad).any()
    _check(q.detach(), k, v, causal=True)


@pytest.mark.parametrize("device", devices())
def test_softmax_scale_and_lse_gradient(device):
    dtype = _dtypes(device)[0]
    q, k, v = _inputs(2, 40, 50, 4, 4, 64, dtype, device)
    _check(q, k, v, softmax_scale=0.3, window_size=(10, 10))
    # a loss that depends on the returned lse: d lse / d scores = P enters dq and dk
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = pyllmops.flash_attention(qs, ks, vs, causal=True, return_lse=True)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ro, rl = ref.attention(q64, k64, v64, causal=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    ((out * go).sum() + (lse * gl).sum()).backward()
    ((ro * go.double()).sum() + (rl * gl.double()).sum()).backward()
    tol = TOL[dtype]["grad"]
    assert_close(qs.grad, q64.grad, tol, "dq")
    assert_close(ks.grad, k64.grad, tol, "dk")
    assert_close(vs.grad, v64.grad, tol, "dv")


@pytest.mark.parametrize("device", devices())
def test_deterministic_bitwise(device, cpu_path):
    dtype = _dtypes(device)[-1]
    q, k, v = _inputs(2, 200, 180, 8, 2, 64, dtype, device)
    g = torch.randn(q.shape, device=device).to(dtype)
    grads = []
    for _ in range(2):
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
        pyllmops.flash_attention(qs, ks, vs, causal=True, deterministic=True).backward(g)
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ---- strides -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_strided_bhsd_inputs(device):
    """(batch, heads, seqlen, d) tensors passed as transposed views, and a slice of a packed qkv."""
    for dtype in _dtypes(device):
        qb = torch.randn(2, 4, 33, 64, device=device).to(dtype)
        kb = torch.randn(2, 2, 47, 64, device=device).to(dtype)
        vb = torch.randn(2, 2, 47, 64, device=device).to(dtype)
        out = _check(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), causal=True)
        assert out.transpose(1, 2).is_contiguous()  # output keeps the input's layout: no copies
        qkv = torch.randn(2, 50, 3, 4, 64, device=device).to(dtype)  # packed projections
        _check(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], window_size=(8, 8))


# ---- varlen --------------------------------------------------------------------------------------
def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (12, 4)), (True, (30, 0))])
def test_varlen(device, causal, window):
    lens_q, lens_k = [1, 300, 17, 0, 64, 129], [5, 260, 17, 3, 64, 1]
    for dtype in _dtypes(device):
        tol = TOL[dtype]
        hq, hkv, d = 4, 2, 64
        q = torch.randn(sum(lens_q), hq, d, device=device).to(dtype).requires_grad_(True)
        k = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_(True)
        v = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_(True)
        cq, ck = _cu(lens_q, device), _cu(lens_k, device)
        out, lse = pyllmops.flash_attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                                   window_size=window, return_lse=True)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ro, rl = ref.attention_varlen(q64, k64, v64, cq.cpu(), ck.cpu(), causal, window)
        assert lse.shape == (hq, sum(lens_q))
        assert_close(out, ro, tol["out"], "out")
        assert torch.equal(torch.isinf(lse), torch.isinf(rl))
        fin = torch.isfinite(rl)
        assert_close(lse[fin], rl[fin], tol["lse"], "lse")
        g = torch.randn_like(out)
        out.backward(g)
        ro.backward(g.double())
        assert_close(q.grad, q64.grad, tol["grad"], "dq")
        assert_close(k.grad, k64.grad, tol["grad"], "dk")
        assert_close(v.grad, v64.grad, tol["grad"], "dv")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("lens_q,lens_k,max_q,max_k", [
    ([0, 0], [0, 0], 0, 0),           # every sequence empty (documented as valid), max_seqlen 0: nothing to launch
    ([0, 0, 0], [0, 0, 0], 5, 7),     # every sequence empty, grids of idle CTAs
    ([0, 0], [3, 5], 0, 5),           # no query: out empty, dk = dv = 0 must still be written
    ([2, 3], [0, 0], 3, 0),           # no key: out 0, lse -inf, dq = 0
    ([0, 4], [6, 0], 4, 6),           # one of each
])
def test_varlen_empty_sequences(device, lens_q, lens_k, max_q, max_k):
    """No query sees a key: outputs and gradients are exact zeros (lse -inf), every element written (outputs
    are poisoned), zero-row tensors pass the contiguity checks whatever their strides, and CUDA launches no
    0-sized grid."""
    hq, hkv, d = 4, 2, 64
    for dtype in _dtypes(device):
        q = torch.randn(sum(lens_q), hq, d, device=device).to(dtype).requires_grad_(True)
        k = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_(True)
        v = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype).requires_grad_(True)
        cq, ck = _cu(lens_q, device), _cu(lens_k, device)
        out, lse = pyllmops.flash_attention_varlen(q, k, v, cq, ck, max_q, max_k, causal=True, return_lse=True)
        assert out.shape == q.shape and lse.shape == (hq, sum(lens_q))
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(lse, torch.full_like(lse, -math.inf))
        (out.float() * torch.randn(out.shape, device=device)).sum().backward(retain_graph=True)
        out.sum().backward()  # an expanded (stride-0) output gradient
        for name, t in (("dq", q), ("dk", k), ("dv", v)):
            assert torch.equal(t.grad, torch.zeros_like(t)), f"{name} must be exactly 0"
        pyllmops.check_kernel_errors(device)


@pytest.mark.parametrize("device", devices())
def test_zero_query_heads(device):
    """heads_q = 0 (a multiple of any heads_kv): empty out and lse, dk = dv = 0."""
    dtype = _dtypes(device)[-1]
    q = torch.randn(2, 5, 0, 64, device=device).to(dtype).requires_grad_(True)
    k = torch.randn(2, 7, 2, 64, device=device).to(dtype).requires_grad_(True)
    v = torch.randn(2, 7, 2, 64, device=device).to(dtype).requires_grad_(True)
    out, lse = pyllmops.flash_attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 0, 5)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("side", ["q", "k"])
def test_varlen_sequence_longer_than_max_seqlen(device, side):
    """max_seqlen_q / max_seqlen_k below a sequence's length breaks the contract (they size the CUDA grid).
    The CPU, and CUDA with validate=True, refuse it before any launch, naming the argument, the sequence and
    the values. CUDA by default does not read the offsets (that would synchronize): the kernels write NaN to
    every output and gradient row of that sequence (never leave them unwritten), compute the other sequences
    exactly, and check_kernel_errors() raises naming the argument, the sequence and the values."""
    lens_q, lens_k = [17, 130, 3], [20, 140, 5]
    max_q, max_k = (100, 140) if side == "q" else (130, 100)
    bad_len, limit = (130, 100) if side == "q" else (140, 100)
    hq, hkv, d = 4, 2, 64
    dtype = _dtypes(device)[-1]
    tol = TOL[dtype]
    q = torch.randn(sum(lens_q), hq, d, device=device).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, device=device).to(dtype)
    cq, ck = _cu(lens_q, device), _cu(lens_k, device)
    fv = pyllmops.flash_attention_varlen
    name = f"cu_seqlens_{side}"
    c = (cq if side == "q" else ck).tolist()
    offsets = f"{name}[1] = {c[1]}, {name}[2] = {c[2]}"
    eager = f"sequence 1 of {name} has length {bad_len} ({offsets}) > max_seqlen_{side} = {limit}"
    for validate in ((True,) if on_cuda(device) else (None, False, True)):
        with pytest.raises(ValueError, match=_re(eager)):
            fv(q, k, v, cq, ck, max_q, max_k, validate=validate)
    # rows > batch * max_seqlen is refused on every device without reading an offset
    with pytest.raises(ValueError, match=_re(f"some sequence of {name} is longer than max_seqlen_{side}")):
        fv(q, k, v, cq, ck, 0 if side == "q" else max_q, 0 if side == "k" else max_k)
    if not on_cuda(device):
        return

    pyllmops.check_kernel_errors(device)  # start clean
    qs, ks, vs = _leaves(q, k, v)
    with poison_outputs(False):  # the NaN below must come from the kernels, not from the test's poison
        out, lse = fv(qs, ks, vs, cq, ck, max_q, max_k, causal=True, return_lse=True)
        g = torch.randn_like(out)
        out.backward(g)
    deferred = f"sequence 1 has length {bad_len} ({offsets}) > max_seqlen_{side} = {limit}"
    with pytest.raises(RuntimeError, match=_re(deferred)):
        pyllmops.check_kernel_errors(device)
    pyllmops.check_kernel_errors(device)  # read and cleared
    bad_q = torch.zeros(sum(lens_q), dtype=torch.bool, device=device)
    bad_q[lens_q[0]:lens_q[0] + lens_q[1]] = True
    bad_k = torch.zeros(sum(lens_k), dtype=torch.bool, device=device)
    bad_k[lens_k[0]:lens_k[0] + lens_k[1]] = True
    assert torch.isnan(out[bad_q]).all() and torch.isnan(lse[:, bad_q]).all()
    for what, t, bad in (("dq", qs.grad, bad_q), ("dk", ks.grad, bad_k), ("dv", vs.grad, bad_k)):
        assert torch.isnan(t[bad]).all(), f"{what}: rows of the bad sequence must be NaN"
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ro, rl = ref.attention_varlen(q64, k64, v64, cq.cpu(), ck.cpu(), causal=True)
    ro.backward(g.double())
    assert_close(out[~bad_q], ro[~bad_q], tol["out"], "out")
    assert_close(lse[:, ~bad_q], rl[:, ~bad_q], tol["lse"], "lse")
    assert_close(qs.grad[~bad_q], q64.grad[~bad_q], tol["grad"], "dq")
    assert_close(ks.grad[~bad_k], k64.grad[~bad_k], tol["grad"], "dk")
    assert_close(vs.grad[~bad_k], v64.grad[~bad_k], tol["grad"], "dv")


@pytest.mark.parametrize("device", devices())
def test_varlen_malformed_offsets(device):
    """cu_seqlens_q[-1] != total_q: the CPU raises; CUDA (which does not read the offsets on the host) writes
    NaN to the last sequence and to the rows no sequence claims, and check_kernel_errors() says why."""
    hq, hkv, d = 4, 2, 64
    dtype = _dtypes(device)[-1]
    q = torch.randn(150, hq, d, device=device).to(dtype)
    k = torch.randn(150, hkv, d, device=device).to(dtype)
    cq = torch.tensor([0, 17, 140], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 17, 150], dtype=torch.int32, device=device)
    if not on_cuda(device):
        with pytest.raises(ValueError, match=_re("cu_seqlens_q[-1] = 140 must equal the 150 rows of q")):
            pyllmops.flash_attention_varlen(q, k, k, cq, ck, 133, 133)
        return
    pyllmops.check_kernel_errors(device)
    with poison_outputs(False):  # the NaN below must come from the kernels, not from the test's poison
        out, lse = pyllmops.flash_attention_varlen(q, k, k, cq, ck, 133, 133, return_lse=True)
    with pytest.raises(RuntimeError,
                       match=_re("sequence 1: cu_seqlens_q[1] = 17, cu_seqlens_q[2] = 140, total_q = 150")):
        pyllmops.check_kernel_errors(device)
    assert torch.isnan(out[17:]).all() and torch.isnan(lse[:, 17:]).all()
    ro, rl = ref.attention_varlen(q[:17].double(), k[:17].double(), k[:17].double(), cq[:2].cpu(), ck[:2].cpu())
    assert_close(out[:17], ro, TOL[dtype]["out"], "out")
    assert_close(lse[:, :17], rl, TOL[dtype]["lse"], "lse")


@pytest.mark.parametrize("device", devices())
def test_varlen_malformed_key_offsets_without_queries(device):
    """No query rows at all: the key offsets are still checked (CUDA used to return before looking)."""
    q = torch.randn(0, 4, 64, device=device).to(_dtypes(device)[-1])
    k = torch.randn(6, 2, 64, device=device).to(q.dtype)
    cq = torch.tensor([0, 0, 0], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 7, 6], dtype=torch.int32, device=device)
    if not on_cuda(device):
        with pytest.raises(ValueError, match=_re("cu_seqlens_k[1] = 7 then cu_seqlens_k[2] = 6")):
            pyllmops.flash_attention_varlen(q, k, k, cq, ck, 0, 7)
        return
    pyllmops.check_kernel_errors(device)
    out = pyllmops.flash_attention_varlen(q, k, k, cq, ck, 0, 7)
    assert out.shape == q.shape
    with pytest.raises(RuntimeError, match="cu_seqlens_k is not 0 = cu_seqlens_k"):
        pyllmops.check_kernel_errors(device)


# ---- SDPA drop-in ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("L,S,is_causal,gqa", [(33, 33, True, False), (20, 70, True, False), (70, 20, True, True),
                                               (65, 40, False, True), (1, 129, False, False)])
def test_sdpa_matches_torch(device, L, S, is_causal, gqa):
    hq, hkv = (8, 2) if gqa else (4, 4)
    for dtype in _dtypes(device):
        q = torch.randn(2, hq, L, 64, device=device).to(dtype).requires_grad_(True)
        k = torch.randn(2, hkv, S, 64, device=device).to(dtype).requires_grad_(True)
        v = torch.randn(2, hkv, S, 64, device=device).to(dtype).requires_grad_(True)
        out = scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa, scale=0.2)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=is_causal, scale=0.2,
                                                                 enable_gqa=gqa)
        assert out.shape == want.shape and out.is_contiguous()
        assert_close(out, want, TOL[dtype]["out"], "out")
        g = torch.randn_like(out)
        out.backward(g)
        want.backward(g.double())
        for name, a, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
            assert_close(a, r, TOL[dtype]["grad"], name)


@pytest.mark.parametrize("device", devices())
def test_sdpa_window(device):
    dtype = _dtypes(device)[0]
    q = torch.randn(1, 2, 50, 64, device=device).to(dtype)
    out = scaled_dot_product_attention(q, q, q, is_causal=True, window_size=(8, -1))
    ro, _ = ref.attention(*(q.double().transpose(1, 2),) * 3, causal=True, window_size=(8, -1))
    assert_close(out, ro.transpose(1, 2), TOL[dtype]["out"], "out")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("L,S", [(20, 70), (70, 20)])
def test_sdpa_window_unequal_lengths(device, L, S):
    """torch's is_causal is aligned top-left when L != S; the window follows the same alignment:
    query i sees key j iff i - 5 <= j <= i. Rows that see no key (i >= S + 5) give 0, not NaN."""
    dtype = _dtypes(device)[0]
    q = torch.randn(1, 2, L, 64, device=device).to(dtype)
    k = torch.randn(1, 2, S, 64, device=device).to(dtype)
    v = torch.randn(1, 2, S, 64, device=device).to(dtype)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(5, -1))
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = (j <= i) & (j >= i - 5)
    seen = mask.any(1)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert_close(out[:, :, seen], want[:, :, seen], TOL[dtype]["out"], "out")
    assert (out[:, :, ~seen] == 0).all()


# ---- module ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_multi_head_attention(device):
    torch_dtype = torch.float32 if device == "cpu" else torch.bfloat16  # CUDA kernels are 16-bit only
    tol = 1e-5 if torch_dtype == torch.float32 else 1.5e-2  # three bf16 projections around attention
    m = pyllmops.nn.MultiHeadAttention(128, num_heads=8, num_kv_heads=2, window=24).to(device, torch_dtype)
    x = torch.randn(2, 70, 128, device=device, dtype=torch_dtype, requires_grad=True)
    y = m(x)
    # reference: same weights, float64, rotary + reference attention
    x64 = x.detach().double().requires_grad_(True)
    w = {n: p.detach().double() for n, p in m.named_parameters()}
    q = (x64 @ w["q_proj.weight"].T).view(2, 70, 8, 16)
    k = (x64 @ w["k_proj.weight"].T).view(2, 70, 2, 16)
    v = (x64 @ w["v_proj.weight"].T).view(2, 70, 2, 16)
    pos = torch.arange(70, device=device, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, device=device, dtype=torch.float64) / 16))
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    rot = (lambda t: torch.cat((-t[..., 8:], t[..., :8]), -1))
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    o, _ = ref.attention(q, k, v, causal=True, window_size=(24, 0))
    want = o.reshape(2, 70, 128) @ w["o_proj.weight"].T
    assert_close(y, want, tol, "y")
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g.double())
    assert_close(x.grad, x64.grad, tol, "dx")
    assert set(dict(m.named_parameters())) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"}


# ---- torch.library / torch.compile ------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    dtype = _dtypes(device)[0]
    q, k, v = _inputs(2, 19, 23, 4, 2, 32, dtype, device)
    for t in (q, k, v):
        t.requires_grad_(True)
    args = (q, k, v, None, None, 19, 23, 0.2, 0.0, 5, 0, False, False)
    torch.library.opcheck(torch.ops.pyllmops.flash_attn_fwd.default, args)
    out, lse = torch.ops.pyllmops.flash_attn_fwd(*args)
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.pyllmops.flash_attn_bwd.default,
                          (g, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, None, None, 19,
                           23, 0.2, 0.0, 5, 0, False, False))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    cuk = torch.tensor([0, 10, 23], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.pyllmops.flash_attn_fwd.default,
                          (q[0].detach(), k[0].detach(), v[0].detach(), cu, cuk, 12, 13, 0.2, 0.0, -1, -1, False, False))


def test_torch_compile_cpu():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 24, 2, 32, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return pyllmops.flash_attention(q, k, v, causal=True).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).backward()
    for a, b in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.equal(a, b)
    fwd = torch.compile(lambda q, k, v: pyllmops.flash_attention(q, k, v, window_size=(4, 4)) * 2, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(fwd(q, k, v), pyllmops.flash_attention(q, k, v, window_size=(4, 4)) * 2)


# ---- bad inputs --------------------------------------------------------------------------------
def test_bad_inputs():
    q, k, v = _inputs(1, 8, 8, 4, 2, 64, torch.float32, "cpu")
    fa = pyllmops.flash_attention
    cases = [
        (lambda: fa(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda: fa(q[0], k, v), ValueError, "q must be 4-D"),
        (lambda: fa(q.double(), k, v), ValueError, "q must have dtype"),
        (lambda: fa(q, k.bfloat16(), v), ValueError, "k must have dtype"),
        (lambda: fa(q, k, v[:, :4]), ValueError, "k and v must have the same shape"),
        (lambda: fa(q[..., :60], k[..., :60], v[..., :60]), ValueError, "head_dim"),
        (lambda: fa(torch.randn(1, 8, 4, 264), torch.randn(1, 8, 4, 264), torch.randn(1, 8, 4, 264)), ValueError,
         "head_dim"),
        (lambda: fa(q, k[..., :32], v[..., :32]), ValueError, "head_dim"),
        (lambda: fa(q[:, :, :3], k, v), ValueError, "multiple of heads"),
        (lambda: fa(q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch"),
        (lambda: fa(q, k, v, causal=1), TypeError, "causal must be a bool"),
        (lambda: fa(q, k, v, window_size=(3,)), ValueError, "window_size must be a pair"),
        (lambda: fa(q, k, v, window_size=(-2, 0)), ValueError, "window_size[0] must be >= -1"),
        (lambda: fa(q, k, v, window_size=(1, 2.0)), TypeError, "window_size[1] must be an int"),
        (lambda: fa(q, k, v, softmax_scale=-1.0), ValueError, "softmax_scale must be > 0 and at most 2.3589e+38"),
        (lambda: fa(q, k, v, softmax_scale="x"), TypeError, "softmax_scale must be a float"),
        (lambda: fa(q, k, v, deterministic=None), TypeError, "deterministic must be a bool"),
        (lambda: fa(q[:, :0], k, v), ValueError, "seqlen_q"),
    ]
    qv, kv = q[0], k[0]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    fv = pyllmops.flash_attention_varlen
    cases += [
        (lambda: fv(qv, kv, kv, cu.long(), cu, 5, 5), ValueError, "cu_seqlens_q must have dtype"),
        (lambda: fv(qv, kv, kv, cu, cu[:2], 5, 5), ValueError, "cu_seqlens_q and cu_seqlens_k"),
        (lambda: fv(qv, kv, kv, cu, cu, 4, 5), ValueError, "max_seqlen_q"),
        (lambda: fv(qv, kv, kv, cu + 1, cu, 5, 5), ValueError, "cu_seqlens_q[0] must be 0"),
        (lambda: fv(qv, kv, kv, torch.tensor([0, 5, 3], dtype=torch.int32), cu, 5, 5), ValueError,
         "non-decreasing"),
        (lambda: fv(qv, kv, kv, torch.tensor([0, 5, 9], dtype=torch.int32), cu, 5, 5), ValueError, "must equal"),
        (lambda: fv(qv, kv, kv, cu, cu, 5.0, 5), TypeError, "max_seqlen_q must be an int"),
        (lambda: fv(q, k, v, cu, cu, 5, 5), ValueError, "q must be 3-D"),
    ]
    sdpa = scaled_dot_product_attention
    qb = q.transpose(1, 2)
    kb = k.transpose(1, 2)
    cases += [
        (lambda: sdpa(qb, kb, kb), ValueError, "enable_gqa=True"),
        (lambda: sdpa(qb, qb, qb, attn_mask=torch.ones(8, 8, dtype=torch.bool)), ValueError, "attn_mask"),
        (lambda: sdpa(qb, qb, qb, dropout_p=0.1), ValueError, "dropout_p"),
        (lambda: sdpa(qb, qb, qb, is_causal=None), TypeError, "is_causal must be a bool"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=_re(msg)):
            fn()
    m = pyllmops.nn.MultiHeadAttention
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        m(64, 4, 3)


def _re(s):
    import re

    return re.escape(s)


def test_binding_rechecks():
    """_C re-checks what its kernels rely on, and throws (ValueError), never crashes."""
    from pyllmops._ext import lib
    from pyllmops.ops._common import view

    q, k, v = _inputs(1, 8, 8, 2, 2, 64, torch.float32, "cpu")
    out, lse = torch.empty_like(q), torch.empty(1, 2, 8)
    # every tensor is bound to a name: a view holds only the data pointer
    lse7, kb, lse_v = torch.empty(1, 2, 7), k.bfloat16(), torch.empty(2, 8)
    cq, ck = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 8], dtype=torch.int32)
    C = lib()
    C.attention_forward(view(q), view(k), view(v), view(out), view(lse), None, None, None, 8, 8, 0.125, 0.0, -1, -1,
                        False, 0)
    common = (8, 8, 0.125, 0.0, -1, -1, False, 0)
    bad = [
        ((view(q), view(k), view(v), view(out), view(lse7), None, None, None) + common, "lse must have shape"),
        ((view(q), view(kb), view(v), view(out), view(lse), None, None, None) + common, "k must have q's dtype"),
        ((view(q), view(k), view(v), view(out), view(lse), None, None, None, 8, 8, 0.125, 0.0, -2, -1, False, 0),
         "window_size"),
        ((view(q[..., :4]), view(k[..., :4]), view(v[..., :4]), view(out[..., :4]), view(lse), None, None, None)
         + common, "head_dim"),
        ((view(q.transpose(-1, -2)), view(k), view(v), view(out), view(lse), None, None, None) + common,
         "contiguous last"),
        ((view(q[0]), view(k[0]), view(v[0]), view(out[0]), view(lse_v), view(cq), view(ck), None, 9, 8, 0.125, 0.0,
          -1, -1, False, 0), "must equal"),
        # rows > batch * max_seqlen: refused before any offset is read (the check CUDA can afford)
        ((view(q[0]), view(k[0]), view(v[0]), view(out[0]), view(lse_v), view(cq), view(ck), None, 9, 7, 0.125, 0.0,
          -1, -1, False, 0), "some sequence of cu_seqlens_k is longer than max_seqlen_k"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=_re(msg)):
            C.attention_forward(*args)


@pytest.mark.parametrize("device", [pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)])
def test_cuda_rejects_fp32(device):
    q = torch.randn(1, 8, 2, 64, device=device)
    with pytest.raises(ValueError, match="q must have dtype"):
        pyllmops.flash_attention(q, q, q)


def test_reference_matches_naive():
    """The oracle itself against the textbook formula with a -inf additive mask (no empty rows)."""
    q, k, v = (torch.randn(1, 9, 2, 16, dtype=torch.float64) for _ in range(3))
    o, lse = ref.attention(q, k, v, causal=True)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(16)
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    want = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    assert rel_err(o, want) < 1e-12
    assert rel_err(lse, torch.logsumexp(s, -1)) < 1e-12


# ---- logit softcap (issue 10) -------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal,window,group", [(False, (-1, -1), 1), (True, (-1, -1), 2), (False, (20, 5), 4),
                                                 (True, (7, 0), 1)])
def test_softcap(device, causal, window, group):
    """s -> softcap * tanh(s / softcap) before mask and softmax; out, lse, and the gradients through tanh."""
    for dtype in _dtypes(device):
        q, k, v = _inputs(2, 90, 77, 4, 4 // group, 64, dtype, device)
        # scale 0.5 makes |s| ~ 4 sigma comparable to the cap: tanh is far from linear there
        _check(q, k, v, causal=causal, window_size=window, softmax_scale=0.5, softcap=2.0)


@pytest.mark.parametrize("device", devices())
def test_softcap_varlen_and_sdpa(device):
    dtype = _dtypes(device)[0]
    tol = TOL[dtype]
    lens_q, lens_k = [5, 130, 0, 64], [9, 100, 3, 64]
    q = torch.randn(sum(lens_q), 4, 32, device=device).to(dtype).requires_grad_(True)
    k = torch.randn(sum(lens_k), 2, 32, device=device).to(dtype).requires_grad_(True)
    v = torch.randn(sum(lens_k), 2, 32, device=device).to(dtype).requires_grad_(True)
    cq, ck = _cu(lens_q, device), _cu(lens_k, device)
    out, lse = pyllmops.flash_attention_varlen(q, k, v, cq, ck, 130, 100, causal=True, window_size=(40, 0),
                                               softcap=3.0, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ro, rl = ref.attention_varlen(q64, k64, v64, cq.cpu(), ck.cpu(), True, (40, 0), softcap=3.0)
    assert_close(out, ro, tol["out"], "out")
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    assert_close(lse[fin], rl[fin], tol["lse"], "lse")
    g = torch.randn_like(out)
    out.backward(g)
    ro.backward(g.double())
    for name, a, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(a, r, tol["grad"], name)
    # SDPA drop-in (top-left causal) and the module pass it through
    qb = torch.randn(1, 2, 40, 64, device=device).to(dtype)
    y = scaled_dot_product_attention(qb, qb, qb, is_causal=True, softcap=1.5)
    want, _ = ref.attention(*(qb.double().transpose(1, 2),) * 3, causal=True, top_left=True, softcap=1.5)
    assert_close(y, want.transpose(1, 2), tol["out"], "sdpa out")
    m = pyllmops.nn.MultiHeadAttention(64, 2, softcap=4.0, rope_base=None).to(device)
    assert m.softcap == 4.0


def test_softcap_makes_a_difference():
    """The cap is applied (a kernel that ignored it would still match a reference that ignored it)."""
    q, k, v = _inputs(1, 40, 40, 2, 2, 64, torch.float32, "cpu")
    a = pyllmops.flash_attention(q, k, v, softmax_scale=1.0)
    b = pyllmops.flash_attention(q, k, v, softmax_scale=1.0, softcap=1.0)
    assert rel_err(a, b) > 1e-2


# ---- NaN policy, scales, overflow (issue 15) ----------------------------------------------------
def _nan_case(device, dtype, poison, causal, window, group=2, dout_row=None, d=32, s=70):
    """Puts NaN where `poison` says; forward + backward against the float64 reference in its exact (masked-pair)
    mode: the NaN pattern of out, lse, dq, dk, dv must be the reference's, and every finite entry must be close."""
    q, k, v = _inputs(1, s, s, 4, 4 // group, d, dtype, device)
    for name, idx in poison:
        t = {"q": q, "k": k, "v": v}[name]
        t[idx] = float("nan")
    qs, ks, vs = _leaves(q, k, v)
    out, lse = pyllmops.flash_attention(qs, ks, vs, causal=causal, window_size=window, return_lse=True)
    g = torch.randn(out.shape, device=device).to(dtype)
    if dout_row is not None:
        g[0, dout_row, 1] = float("nan")
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ro, rl = ref.attention(q64, k64, v64, causal, window, exact=True)
    ro.backward(g.double())
    tol = TOL[dtype]
    for name, a, r, t in (("out", out, ro, tol["out"]), ("lse", lse, rl, tol["lse"]), ("dq", qs.grad, q64.grad,
                          tol["grad"]), ("dk", ks.grad, k64.grad, tol["grad"]), ("dv", vs.grad, v64.grad, tol["grad"])):
        nan_a, nan_r = torch.isnan(a), torch.isnan(r)
        assert torch.equal(nan_a, nan_r), (f"{name}: NaN at {int(nan_a.sum())} entries, the reference at "
                                           f"{int(nan_r.sum())} ({int((nan_a != nan_r).sum())} differ)")
        fin = ~nan_r
        assert torch.equal(torch.isinf(a[fin]), torch.isinf(r[fin])), f"{name}: -inf entries differ"
        f2 = fin & torch.isfinite(r)
        assert_close(a[f2], r[f2], t, name)
    return out, lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", ["q_row", "k_in_window", "k_outside_window", "v_element", "dout_row", "q_causal_full",
                                  "v_last_column", "k_last_column", "q_full_tile", "k_full_tile"])
def test_nan_policy(request, device, case):
    """A NaN reaches exactly the outputs and gradients it touches (the float64 reference), never 0, -inf or a zero
    gradient (std::max used to drop it and make the row look empty), and a NaN outside the window touches nothing."""
    # strict: the marker must go when the CUDA kernels give the exact pattern (the full-tile cases have no masked
    # pair for a NaN to leak across, so the CUDA kernels give it there already)
    if on_cuda(device) and case not in ("q_full_tile", "k_full_tile"):
        request.applymarker(pytest.mark.xfail(strict=True, reason="the CUDA kernels propagate NaN (never 0 / -inf) but "
                                              "over-approximate: 0 * NaN inside a visited tile reaches rows of that "
                                              "tile that do not see the NaN (test_attention_cuda.py checks no laundering)"))
    dtype = _dtypes(device)[0]
    cases = {
        "q_row": dict(poison=[("q", (0, 33, 1))], causal=False, window=(10, 10)),
        "k_in_window": dict(poison=[("k", (0, 40, 0))], causal=True, window=(12, 0)),
        "k_outside_window": dict(poison=[("k", (0, 69, 0))], causal=True, window=(5, 0)),  # query 69 sees it only
        "v_element": dict(poison=[("v", (0, 20, 1, 7))], causal=False, window=(3, 30)),
        "dout_row": dict(poison=[], causal=True, window=(16, 0), dout_row=50),
        "q_causal_full": dict(poison=[("q", (0, 3, 2))], causal=True, window=(-1, -1)),  # the CPU route's shape
        # head_dim 40: the NaN in the last column, past the CPU loader's last full vector (16 floats with AVX-512)
        "v_last_column": dict(poison=[("v", (0, 20, 1, 39))], causal=False, window=(3, 30), d=40),
        "k_last_column": dict(poison=[("k", (0, 40, 0, 39))], causal=True, window=(12, 0), d=40),
        # 300 keys without a mask: 128-key tiles that the CPU forward's score product also takes the row maxima of
        # (gemm_rowmax; those maxima may drop a NaN, which must still reach the row through the exponentials)
        "q_full_tile": dict(poison=[("q", (0, 150, 1, 5))], causal=False, window=(-1, -1), s=300),
        "k_full_tile": dict(poison=[("k", (0, 200, 0, 3))], causal=False, window=(-1, -1), s=300),
    }
    out, lse = _nan_case(device, dtype, **cases[case])
    if case == "q_row":
        assert torch.isnan(out[0, 33, 1]).all() and torch.isnan(lse[0, 1, 33])
        assert not torch.isnan(out[0, :33]).any()


@pytest.mark.parametrize("device", devices())
def test_inf_input_is_not_laundered(device):
    dtype = _dtypes(device)[0]
    q, k, v = _inputs(1, 30, 30, 2, 2, 32, dtype, device)
    q[0, 4, 0, 0] = float("inf")
    out, lse = pyllmops.flash_attention(q, k, v, window_size=(6, 6), return_lse=True)
    assert not torch.isfinite(out[0, 4, 0]).all() and not torch.isfinite(lse[0, 0, 4])
    assert torch.isfinite(out[0, 12:, 0]).all() and torch.isfinite(out[0, :, 1]).all()


def _separated_inputs(b, sq, sk, hq, hkv, d, dtype, device, window=(-1, -1)):
    """_inputs whose rows' two largest visible scores q.k differ by more than 1e-3. At softmax scales of 1e5 and
    beyond a closer pair is ill-conditioned in float32: the scores' rounding (~1e-6 here) decides the mix of the two
    values (seed 338230084: 12.16980002 vs 12.16979998 made out 50/50 where float64 picks one key; out error 0.04),
    so such draws (~1 in 20) are redrawn."""
    while True:
        q, k, v = _inputs(b, sq, sk, hq, hkv, d, dtype, device)
        kr = k.double().repeat_interleave(hq // hkv, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kr)
        s = s.masked_fill(~ref.visible_mask(sq, sk, window, False, device=device), -math.inf)
        top2 = s.topk(2, dim=-1).values
        if ((top2[..., 0] - top2[..., 1]) > 1e-3).all():
            return q, k, v


@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_large_softmax_scale_full_tiles(scale):
    """300 keys without a mask: the CPU forward takes the row maxima of its 128-key score tiles from the tile product
    (gemm_rowmax). Softmax forgives a maximum that is off by a little, not one off by more than 128 in base 2: at
    these scales a wrong maximum (one column panel's, say) overflows exp2 to inf and the output to NaN."""
    q, k, v = _separated_inputs(1, 64, 300, 2, 2, 32, torch.float32, "cpu")
    out = pyllmops.flash_attention(q, k, v, softmax_scale=scale)
    ro, _ = ref.attention(q.double(), k.double(), v.double(), False, (-1, -1), scale)
    assert_close(out, ro, 1e-4, "out")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale", [1e3, 1e5, 1e15, 1e30])
@pytest.mark.parametrize("window", [(-1, -1), (30, 30)])
def test_large_softmax_scale(request, device, cpu_path, scale, window):
    """The backward rebuilds P from recomputed row statistics, not from the float32 lse (issue 15: dv error 0.06 at
    scale 1e5 and NaN at 1e15 before). The softmax is then nearly one-hot: out and dv are well conditioned (dq and
    dk are scale times a cancellation, conditioned like the scale itself: only finite is asserted)."""
    if on_cuda(device) and scale >= 1e5:  # strict: the marker must go when the CUDA backward is fixed
        request.applymarker(pytest.mark.xfail(strict=True, reason="the CUDA backward rebuilds P from the float32 lse "
                                              "(dv error 0.04 at 1e5, NaN beyond; not fixed yet)"))
    dtype = _dtypes(device)[0]
    tol = 1e-4 if dtype == torch.float32 else TOL[dtype]["out"]  # at 1e3 fp32's score rounding alone gives 8e-6
    q, k, v = _separated_inputs(2, 60, 70, 2, 2, 32, dtype, device, window)
    qs, ks, vs = _leaves(q, k, v)
    out = pyllmops.flash_attention(qs, ks, vs, softmax_scale=scale, window_size=window)
    g = torch.randn_like(out)
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ro, _ = ref.attention(q64, k64, v64, False, window, scale)
    ro.backward(g.double())
    assert_close(out, ro, tol, "out")
    assert_close(vs.grad, v64.grad, max(tol, TOL[dtype]["grad"]), "dv")
    assert torch.isfinite(qs.grad).all() and torch.isfinite(ks.grad).all()


@pytest.mark.parametrize("device", devices())
def test_window_bounds_beyond_int64_arithmetic(device):
    """Windows of at least seqlen_q + seqlen_k are unbounded, also int64 max and 10**30 (issue 15: the sums
    i + shift +- left/right overflowed; 10**30 gave torch's "Expected a value of type 'int'")."""
    dtype = _dtypes(device)[0]
    big = 2 ** 63 - 1
    q, k, v = _inputs(1, 90, 40, 2, 1, 32, dtype, device)  # sq > sk
    fa = pyllmops.flash_attention
    full, causal = fa(q, k, v), fa(q, k, v, causal=True)
    for w in ((-1, big), (big, big), (big, -1), (10 ** 30, 10 ** 30)):
        assert torch.equal(fa(q, k, v, window_size=w), full), w
    for w in ((big, 0), (10 ** 30, 0)):
        assert torch.equal(fa(q, k, v, window_size=w), causal), w
    qb, kb = q.transpose(1, 2), k.transpose(1, 2)
    assert torch.equal(scaled_dot_product_attention(qb, kb, kb, is_causal=True, window_size=(big, big), enable_gqa=True),
                       scaled_dot_product_attention(qb, kb, kb, is_causal=True, enable_gqa=True))
    cu = _cu([30, 60], device)
    cuk = _cu([10, 30], device)
    fv = pyllmops.flash_attention_varlen
    assert torch.equal(fv(q[0], k[0], v[0], cu, cuk, 60, 30, window_size=(big, 0)),
                       fv(q[0], k[0], v[0], cu, cuk, 60, 30, causal=True))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("max_seqlen", [2 ** 40, 2 ** 62, 2 ** 63 - 1])
def test_varlen_huge_max_seqlen(device, max_seqlen):
    """max_seqlen far above the rows is clamped to them (Python and C++): no loop over 2**40 / 64 tiles, no tile count
    that overflows into an unwritten output; fwd and bwd equal the call with the exact maxima."""
    dtype = _dtypes(device)[0]
    lens = [20, 50, 7]
    q = torch.randn(sum(lens), 2, 32, device=device).to(dtype)
    cu = _cu(lens, device)
    fv = pyllmops.flash_attention_varlen
    a, b = _leaves(q, q)
    want = fv(a, a, a, cu, cu, 50, 50, causal=True)
    got = fv(b, b, b, cu, cu, max_seqlen, max_seqlen, causal=True)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_scale_and_softcap_messages():
    q, k, v = _inputs(1, 8, 8, 2, 2, 32, torch.float32, "cpu")
    fa = pyllmops.flash_attention
    for bad in (1e39, float("inf"), float("nan"), 0.0, -1.0, 1e-50):
        with pytest.raises(ValueError, match=_re(f"softmax_scale must be > 0 and at most 2.3589e+38 (positive and "
                                                 f"finite in float32, also after the kernels multiply it by log2(e)), "
                                                 f"got {bad!r}")):
            fa(q, k, v, softmax_scale=bad)
    assert torch.isfinite(fa(q, k, v, softmax_scale=1e31 / 1e31 * 1e-3)).all()  # small scales are fine
    for bad in (-1.0, float("nan"), float("inf"), 1e39):
        with pytest.raises(ValueError, match=_re(f"softcap must be 0 (off) or positive and finite in float32 (at most "
                                                 f"3.4028e+38), got {bad!r}")):
            fa(q, k, v, softcap=bad)
    with pytest.raises(TypeError, match=_re("softcap must be a float (0.0 = off), got bool True")):
        fa(q, k, v, softcap=True)
    with pytest.raises(ValueError, match=_re("num_heads must be >= 1, got 0")):
        pyllmops.nn.MultiHeadAttention(64, 0)
    with pytest.raises(ValueError, match=_re("softcap must be 0 (off)")):
        pyllmops.nn.MultiHeadAttention(64, 2, softcap=-2.0)


def test_binding_rechecks_bounds(monkeypatch):
    """_C checks scale / softcap in float32 and clamps max_seqlen and windows before any loop (a direct call with
    2**62 returns at once, and int64-max windows equal unbounded)."""
    from pyllmops._ext import lib

    monkeypatch.setenv("PYLLMOPS_ATTENTION_CPU", "kernel")  # bitwise comparisons with the same kernel
    from pyllmops.ops._common import view

    C = lib()
    q, k, v = _inputs(1, 8, 8, 2, 2, 32, torch.float32, "cpu")
    out, lse = torch.empty_like(q), torch.empty(1, 2, 8)
    for scale, msg in ((1e39, "softmax_scale must be > 0 and at most"), (float("nan"), "softmax_scale must be > 0")):
        with pytest.raises(ValueError, match=_re(msg)):
            C.attention_forward(view(q), view(k), view(v), view(out), view(lse), None, None, None, 8, 8, scale, 0.0,
                                -1, -1, False, 0)
    with pytest.raises(ValueError, match=_re("softcap must be 0 (off) or positive and finite in float32")):
        C.attention_forward(view(q), view(k), view(v), view(out), view(lse), None, None, None, 8, 8, 0.1, 1e39, -1, -1,
                            False, 0)
    C.attention_forward(view(q), view(k), view(v), view(out), view(lse), None, None, None, 8, 8, 0.1, 0.0, 2 ** 63 - 1,
                        2 ** 63 - 1, False, 0)
    assert torch.equal(out, pyllmops.flash_attention(q, k, v, softmax_scale=0.1))
    qv, outv, lsev = q[0], torch.empty_like(q[0]), torch.empty(2, 8)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    C.attention_forward(view(qv), view(qv), view(qv), view(outv), view(lsev), view(cu), view(cu), None, 2 ** 62,
                        2 ** 62, 0.1, 0.0, -1, -1, False, 0)
    assert torch.equal(outv, pyllmops.flash_attention_varlen(qv, qv, qv, cu, cu, 5, 5, softmax_scale=0.1))


def test_varlen_strided_and_meta_metadata():
    """Valid strided cu_seqlens are accepted (copied to contiguous); meta tensors get shapes (no offset is read)."""
    q = torch.randn(50, 2, 32)
    cu = _cu([20, 30], "cpu")
    strided = torch.stack([cu, torch.zeros_like(cu)], 1)[:, 0]
    assert strided.stride() == (2,)
    fv = pyllmops.flash_attention_varlen
    assert torch.equal(fv(q, q, q, strided, strided, 30, 30), fv(q, q, q, cu, cu, 30, 30))
    qm = q.to("meta")
    out, lse = fv(qm, qm, qm, cu.to("meta"), cu.to("meta"), 30, 30, return_lse=True)
    assert out.shape == q.shape and out.device.type == "meta" and lse.shape == (2, 50)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpu_isa_fallbacks(isa):
    """The tile kernel's portable and AVX2 builds (the default picks the best the CPU has): same results as the
    reference, in a subprocess since the choice is made once per process (PYLLMOPS_CPU_ISA caps it)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, pyllmops\n"
        "from pyllmops.reference import attention as ref\n"
        "from pyllmops._ext import lib\n"
        "from tests.conftest import rel_err\n"
        "print(lib().attention_cpu_isa())\n"
        "q, k, v = (torch.randn(1, 100, 2, 40) for _ in range(3))\n"
        "qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))\n"
        "o = pyllmops.flash_attention(qs, ks, vs, causal=True, window_size=(30, 0), softcap=5.0)\n"
        "g = torch.randn_like(o); o.backward(g)\n"
        "q6, k6, v6 = (t.double().requires_grad_(True) for t in (q, k, v))\n"
        "r, _ = ref.attention(q6, k6, v6, True, (30, 0), softcap=5.0); r.backward(g.double())\n"
        "print(max(rel_err(o, r), rel_err(qs.grad, q6.grad), rel_err(ks.grad, k6.grad), rel_err(vs.grad, v6.grad)))\n")
    env = dict(os.environ, PYLLMOPS_CPU_ISA=isa, PYLLMOPS_ATTENTION_CPU="kernel")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr
    name, err = res.stdout.split()
    assert name in ("baseline", isa)  # a CPU without AVX2 runs the baseline
    assert float(err) < 3e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_max_abs_pass(dtype):
    """_C.attention_max_abs (the route's finiteness / |lse| check): max |x| in every layout (dense in any dimension
    order: one flat pass; strided: row by row), NaN wherever one sits, inf for +-inf."""
    from pyllmops._ext import lib
    from pyllmops.ops._common import view

    x = torch.randn(2, 3, 37, 24, dtype=dtype) * 5
    layouts = (x, x.transpose(1, 2), x.permute(3, 0, 2, 1), x[:, :, ::2], x[..., :8], x[0, 1, 5, :1], x[:, :, :0])
    for t in layouts:
        want = t.abs().max().item() if t.numel() else 0.0
        assert lib().attention_max_abs(view(t)) == want
    for pos in ((0, 0, 0, 0), (1, 2, 36, 23), (1, 0, 17, 5)):
        for bad, want in ((float("nan"), None), (float("-inf"), math.inf), (float("inf"), math.inf)):
            y = x.clone()
            y[pos] = bad
            padded = torch.zeros(2, 3, 37, 32, dtype=dtype)
            padded[..., :24] = y
            for t in (y, y.transpose(1, 2), padded[..., :24]):  # dense, dense permuted, strided rows
                got = lib().attention_max_abs(view(t))
                assert (math.isnan(got) if want is None else got == want), (pos, bad, got)
    # the pass keeps 64 running maxima (lanes) over blocks of 64 elements, then a scalar tail: the largest |x| (and a
    # NaN) at every position of a run of two blocks and a tail
    flat = torch.rand(2 * 64 + 17, dtype=dtype)  # [0, 1)
    for i in range(flat.numel()):
        y = flat.clone()
        y[i] = -7.0
        assert lib().attention_max_abs(view(y)) == 7.0, i
        y[i] = float("nan")
        assert math.isnan(lib().attention_max_abs(view(y))), i


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (True, (16, 0), 5.0)])
def test_eager_entry_matches_registered_op(causal, window, softcap, monkeypatch):
    """flash_attention calls an autograd.Function in plain eager mode and the registered op otherwise (torch.compile,
    dispatch modes); both give the same out, lse and gradients, with and without a gradient on the lse."""
    from pyllmops.ops import attention as A

    q, k, v = (torch.randn(2, 40, h, 32) for h in (4, 2, 2))
    results = []
    for eager in (True, False):
        monkeypatch.setattr(A, "plain_eager", lambda x, eager=eager: eager)
        for with_lse in (False, True):
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            out, lse = pyllmops.flash_attention(qs, ks, vs, causal=causal, window_size=window, softcap=softcap,
                                                return_lse=True)
            loss = (out * out).sum() + (lse.sum() if with_lse else 0.0)
            loss.backward()
            results.append([out, lse, qs.grad, ks.grad, vs.grad])
    for u, v_ in zip(results[:2], results[2:]):
        for a, b in zip(u, v_):
            assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 64])
def test_cpu_backward_single_and_two_pass(threads, monkeypatch):
    """The CPU kernel's backward runs in one pass (five tile products per visited pair, one task per sequence and kv
    head, dq accumulated by the task that owns it) when those tasks keep every thread busy, else in two (dq, then
    dk / dv): with these shapes (at most 4 tasks) 1 thread takes the single pass and 64 threads the two passes. Both
    against the float64 reference: masks, GQA, softcap, varlen, recomputed statistics (large scale), NaN policy."""
    from pyllmops._ext import lib
    monkeypatch.setenv("PYLLMOPS_ATTENTION_CPU", "kernel")
    lib().set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            _check(*_inputs(2, 150, 150, 4, 2, 40, dtype, "cpu"), causal=True)
            _check(*_inputs(1, 100, 170, 4, 1, 64, dtype, "cpu"), window_size=(40, 10), softcap=5.0)
            _check(*_inputs(2, 130, 70, 2, 2, 96, dtype, "cpu"), causal=True, window_size=(20, 0))
        test_varlen("cpu", True, (30, 0))
        q, k, v = _separated_inputs(2, 60, 70, 2, 2, 32, torch.float32, "cpu")  # statistics recomputed (|lse| > 16)
        qs, ks, vs = _leaves(q, k, v)
        out = pyllmops.flash_attention(qs, ks, vs, softmax_scale=1e5)
        g = torch.randn_like(out)
        out.backward(g)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        ro, _ = ref.attention(q64, k64, v64, False, (-1, -1), 1e5)
        ro.backward(g.double())
        assert_close(vs.grad, v64.grad, 1e-4, "dv")
        assert torch.isfinite(qs.grad).all() and torch.isfinite(ks.grad).all()
        _nan_case("cpu", torch.float32, [("k", (0, 40, 0))], True, (12, 0))
        _nan_case("cpu", torch.float32, [("v", (0, 20, 1, 7))], False, (3, 30))
        _nan_case("cpu", torch.float32, [], True, (16, 0), dout_row=50)
    finally:
        lib().set_num_threads(0)


def test_bench_cpu_rows_say_which_kernel_ran(monkeypatch):
    """`bench attention` on the CPU: ours and SDPA timed together per row (harness.measure_together), each of ours
    noted with the kernel it ran (route_counts)."""
    from pyllmops.bench import attention as bench_attention
    from pyllmops.bench.harness import Bench

    bench = Bench("attention", "cpu", quick=True, progress=False)
    bench._ceilings = {"copy_gbps": 10.0, "matmul_tflops": 1.0, "matmul": "fake"}
    # 2 (sequence, kv head) tasks: 4 threads send the backward's two passes to torch's kernel, 1 keeps the single pass
    monkeypatch.setenv("PYLLMOPS_NUM_THREADS", "4")
    bench_attention._cpu_dense(bench, "attention", 1, 2, 2, 48, 64, False, (-1, -1))
    monkeypatch.setenv("PYLLMOPS_NUM_THREADS", "1")
    bench_attention._cpu_dense(bench, "attention", 1, 2, 2, 48, 64, True, (-1, -1))
    bench._finish()
    ours = [r for r in bench.rows if r["provider"] == "pyllmops"]
    assert [(r["x"], r["mode"]) for r in ours] == [("b1 h2 s48 d64", "fwd"), ("b1 h2 s48 d64", "fwd+bwd"),
                                                   ("b1 h2 s48 d64 causal", "fwd"),
                                                   ("b1 h2 s48 d64 causal", "fwd+bwd")]
    assert [r["note"] for r in ours] == ["ran pyllmops' kernel", "forward ran pyllmops' kernel, backward torch's CPU "
                                         "flash kernel"] + ["ran pyllmops' kernel"] * 2
    assert all(r["vs_baseline"] > 0 for r in ours)
    assert len([r for r in bench.rows if r["provider"] == "torch sdpa (cpu)" and r["baseline"]]) == 4
