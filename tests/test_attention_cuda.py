"""CUDA attention kernels (csrc/attention/attention_{fwd,bwd}.cu): logit softcap and the NaN policy, against
float64 references. Calls the custom ops torch.ops.pyllmops.flash_attn_fwd / flash_attn_bwd directly (the kernels'
own contract; the public wrappers are tested in test_attention.py). On an emulated build these run the CUDA
kernels on CPU tensors (docs/emulator.md)."""
import math

import pytest
import torch

from pyllmops.reference import attention as ref
from tests.conftest import CUDA, CUDA_MARKS, assert_close

pytestmark = CUDA_MARKS

# Relative Frobenius error against float64, as test_attention.py's TOL (a few times what a correct kernel shows).
TOL = {torch.float16: {"out": 2e-3, "grad": 3e-3, "lse": 1e-5},
       torch.bfloat16: {"out": 6e-3, "grad": 8e-3, "lse": 1e-5}}


def _ref_attention(q, k, v, softcap=0.0, causal=False, window=(-1, -1), scale=None):
    """The float64 reference (pyllmops.reference.attention: softcap, masks, rows that see no key give out 0, lse -inf
    and zero gradients, the NaN policy) in this file's argument order."""
    return ref.attention(q, k, v, causal, window, scale, softcap=softcap)


def _ref_backward_given_out(q, k, v, out, g, softcap=0.0, causal=False, window=(-1, -1)):
    """Float64 gradients of the backward op for its actual inputs: delta = rowsum(dO * out) with the `out` the op is
    given (the forward's 16-bit output), as the kernels compute it, instead of the exact output. For a nearly one-hot
    row (a capped score far above the rest) dS = P (dP - delta) is a cancellation that the 16-bit rounding of out
    dominates; this reference carries that rounding, so the comparison measures the kernels' own error."""
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d)
    q, k, v, out, g = (t.double() for t in (q, k, v, out, g))
    kh, vh = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kh) * scale
    dt = torch.ones_like(s)
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s, dt = softcap * t, 1 - t * t
    ok = ref.visible_mask(sq, k.shape[1], window, causal, device=q.device)
    s = torch.where(ok, s, -math.inf)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(ok, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)), 0.0)
    dp = torch.einsum("bihd,bjhd->bhij", g, vh)
    delta = (g * out).sum(-1).transpose(1, 2).unsqueeze(-1)
    ds = p * (dp - delta) * dt
    dq = torch.einsum("bhij,bjhd->bihd", ds, kh) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, q) * scale
    dv = torch.einsum("bhij,bihd->bjhd", p, g)
    fold = (lambda x: x.unflatten(2, (hkv, group)).sum(3))
    return dq, fold(dk), fold(dv)


def _fwd(q, k, v, softcap=0.0, causal=False, window=(-1, -1), scale=None):
    left, right = window
    if causal:
        right = 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.pyllmops.flash_attn_fwd(q, k, v, None, None, q.shape[1], k.shape[1], scale, softcap, left, right,
                                             False, False)


def _inputs(b, sq, sk, hq, hkv, d, dtype, mul=1.0):
    q = (torch.randn(b, sq, hq, d, device=CUDA) * mul).to(dtype)
    k = (torch.randn(b, sk, hkv, d, device=CUDA) * mul).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=CUDA).to(dtype)
    return q, k, v


def _check_fwd_bwd(q, k, v, softcap, causal=False, window=(-1, -1)):
    tol = TOL[q.dtype]
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = _fwd(qs, ks, vs, softcap, causal, window)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = _ref_attention(q64, k64, v64, softcap, causal, window)
    assert_close(out, ro, tol["out"], "out")
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "lse: -inf rows differ from the reference"
    assert_close(lse[fin], rl[fin], tol["lse"], "lse")
    g = torch.randn_like(out)
    out.backward(g)
    ro.backward(g.double())
    for name, a, r in (("dq", qs.grad, q64.grad), ("dk", ks.grad, k64.grad), ("dv", vs.grad, v64.grad)):
        assert_close(a, r, tol["grad"], name)


# ---- logit softcap ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (20, 5))])
def test_softcap_fwd_bwd(dtype, causal, window):
    """Scores of std ~9 against a cap of 5: tanh saturates, so a kernel without the cap (or without the tanh
    derivative in the backward) is far outside the tolerance."""
    q, k, v = _inputs(2, 77, 140, 4, 2, 64, dtype, mul=3.0)
    _check_fwd_bwd(q, k, v, 5.0, causal, window)


@pytest.mark.parametrize("d", [128, 40, 256])
def test_softcap_head_dims(d):
    q, k, v = _inputs(1, 45, 70, 2, 1, d, torch.bfloat16, mul=3.0)
    _check_fwd_bwd(q, k, v, 8.0, causal=True)


def test_softcap_d128_window_gqa():
    """Softcap with a window narrower than a 128-key CTA and GQA at head dim 128: the tanh derivative recovered
    from P on warp tiles the band cuts (masked selects) and on full ones (no selects), with warps skipping items."""
    q, k, v = _inputs(1, 100, 200, 4, 2, 128, torch.bfloat16, mul=3.0)
    _check_fwd_bwd(q, k, v, 5.0, False, (40, 0))


def test_softcap_changes_the_result():
    """The cap is applied (not ignored): capped and uncapped outputs differ by far more than rounding."""
    q, k, v = _inputs(1, 33, 33, 2, 2, 64, torch.float16, mul=3.0)
    capped, _ = _fwd(q, k, v, 2.0)
    plain, _ = _fwd(q, k, v, 0.0)
    assert (capped.float() - plain.float()).norm() > 0.1 * plain.float().norm()


def test_softcap_varlen():
    lens = [5, 70, 33]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=CUDA)
    total, h, d = sum(lens), 2, 64
    q, k, v = ((torch.randn(total, h, d, device=CUDA) * (3.0 if i < 2 else 1.0)).to(torch.bfloat16)
               for i in range(3))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    scale = 1.0 / math.sqrt(d)
    out, lse = torch.ops.pyllmops.flash_attn_fwd(qs, ks, vs, cu, cu, max(lens), max(lens), scale, 6.0, -1, 0,
                                                 False, False)
    g = torch.randn_like(out)
    out.backward(g)
    c = cu.tolist()
    for b in range(len(lens)):
        sl = slice(c[b], c[b + 1])
        ro, rl = _ref_attention(*(t[sl].double().unsqueeze(0) for t in (q, k, v)), 6.0, causal=True)
        assert_close(out[sl], ro[0], TOL[torch.bfloat16]["out"], f"out of sequence {b}")
        assert_close(lse[:, sl], rl[0], TOL[torch.bfloat16]["lse"], f"lse of sequence {b}")
        # Gradients against the backward op's float64 result for its inputs (out included): a 5-row causal
        # sequence with saturated scores is nearly one-hot; with PYLLMOPS_TEST_SEED=1491135941 its dq was 0.14
        # (relative) from the exact-output gradient, in both the two-pass and the atomic-dQ backward.
        refs = _ref_backward_given_out(*(t[sl].unsqueeze(0) for t in (q, k, v, out.detach(), g)), 6.0, causal=True)
        for name, a, r in zip(("dq", "dk", "dv"), (qs.grad, ks.grad, vs.grad), refs):
            # per sequence, some only a few rows long: 2 bf16 ulps (the whole-tensor bound is 8e-3)
            assert_close(a[sl], r[0], 1.6e-2, f"{name} of sequence {b}")


# ---- NaN policy (docs/attention.md) ----------------------------------------------------------------------------
def _same_nan_and_close(a, r, tol, what):
    """NaN exactly where the float64 reference has NaN; everything else close to it."""
    assert torch.equal(torch.isnan(a), torch.isnan(r)), (
        f"{what}: NaN at {torch.isnan(a).sum().item()} places, reference at {torch.isnan(r).sum().item()}")
    fin = ~torch.isnan(r)
    assert_close(a[fin], r[fin], tol, what)


@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_forward_reaches_what_it_touches(where):
    """A NaN query row gives NaN out and lse for that row only (not a "fully masked" 0 / -inf row). A NaN key
    (key 64, window (5, 0)) makes NaN exactly the rows whose window holds it (queries 64..69); queries 70.. do
    not see it although it lies in a key tile their CTA visits, and stay finite."""
    q, k, v = _inputs(1, 150, 150, 2, 2, 64, torch.float16)
    if where == "q":
        q[0, 70, 1, 5] = float("nan")
    else:
        k[0, 64, 0, 3] = float("nan")
    out, lse = _fwd(q, k, v, 0.0, False, (5, 0))
    ro, rl = _ref_attention(q.double(), k.double(), v.double(), 0.0, False, (5, 0))
    _same_nan_and_close(out, ro, TOL[torch.float16]["out"], "out")
    _same_nan_and_close(lse, rl, TOL[torch.float16]["lse"], "lse")
    assert torch.isnan(out).any(), "the NaN input must reach some output"
    assert not torch.isnan(out[0, :60]).any() and not torch.isnan(out[0, 71:]).any()


def test_nan_backward_reaches_what_it_touches():
    """No mask: a NaN query row makes its dq row NaN (only it) and every dk, dv row NaN (each key is seen by
    that query), exactly as the float64 reference's gradients."""
    q, k, v = _inputs(1, 100, 90, 2, 1, 64, torch.bfloat16)
    q[0, 33, 1, 0] = float("nan")
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = _fwd(qs, ks, vs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, _ = _ref_attention(q64, k64, v64)
    g = torch.randn_like(out)
    out.backward(g)
    ro.backward(g.double())
    tol = TOL[torch.bfloat16]
    _same_nan_and_close(out, ro, tol["out"], "out")
    _same_nan_and_close(qs.grad, q64.grad, tol["grad"], "dq")
    assert torch.isnan(qs.grad[0, 33, 1]).all() and not torch.isnan(qs.grad[0, :33]).any()
    assert torch.isnan(ks.grad).all() and torch.isnan(vs.grad).all()


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_masked_nan_value_gives_zero_ds(deterministic):
    """Masked elements give dS exactly 0 even where dP is NaN: a NaN value row (key 64 of head 0, window (5, 0): seen
    by queries 64..69 only) makes dP NaN for every query, but only the dq rows of the queries that see it and its own
    dk row may turn NaN. The backward gets a finite out (the forward of the clean values; lse does not depend on V),
    so delta is finite and the forward's own 0 * NaN (docs/attention.md) does not hide a missing select. d 128: the
    masked rows lie in warp tiles the band cuts and in the same 128-key CTA as unmasked ones."""
    q, k, v = _inputs(1, 150, 150, 2, 2, 128, torch.bfloat16)
    out, lse = _fwd(q, k, v, 0.0, False, (5, 0))
    g = torch.randn_like(out)
    clean = _bwd(q, k, v, out, lse, g, False, (5, 0), deterministic)
    v_nan = v.clone()
    v_nan[0, 64, 0] = float("nan")
    dq, dk, dv = _bwd(q, k, v_nan, out, lse, g, False, (5, 0), deterministic)
    seen = torch.zeros(150, dtype=torch.bool)
    seen[64:70] = True
    assert torch.isnan(dq[0, seen, 0]).all() and torch.isnan(dk[0, 64, 0]).all()
    assert_close(dq[0, ~seen, 0], clean[0][0, ~seen, 0], 1e-3, "dq of queries that do not see the NaN value")
    assert_close(dq[0, :, 1], clean[0][0, :, 1], 1e-3, "dq of the other head")
    others = torch.arange(150) != 64
    assert_close(dk[0, others], clean[1][0, others], 1e-3, "dk of the other keys")
    assert_close(dk[0, :, 1], clean[1][0, :, 1], 1e-3, "dk of the other head")
    assert_close(dv, clean[2], 1e-3, "dv")


def test_fully_masked_rows_stay_zero_with_nan_elsewhere():
    """Rows that see no key (sq > sk, bottom-right causal) give out 0 and lse -inf even when another row is NaN."""
    q, k, v = _inputs(1, 40, 16, 1, 1, 64, torch.float16)
    q[0, 39, 0, 0] = float("nan")
    out, lse = _fwd(q, k, v, 0.0, True)
    assert (out[0, :24] == 0).all() and torch.isinf(lse[0, 0, :24]).all() and (lse[0, 0, :24] < 0).all()
    assert torch.isnan(out[0, 39]).all() and torch.isnan(lse[0, 0, 39])
    assert not torch.isnan(out[0, :39]).any()


# ---- backward modes: atomic dQ (default) and deterministic ------------------------------------------------------
def _bwd(q, k, v, out, lse, g, causal, window, deterministic, cu=None, max_q=None, max_k=None):
    left, right = window
    if causal:
        right = 0
    scale = 1.0 / math.sqrt(q.shape[-1])
    max_q = q.shape[1] if max_q is None else max_q
    max_k = k.shape[1] if max_k is None else max_k
    return torch.ops.pyllmops.flash_attn_bwd(g, q, k, v, out, lse, None, cu, cu, max_q, max_k, scale, 0.0, left,
                                             right, False, deterministic)


# (batch, sq, sk, hq, hkv, d, causal, window): MQA over 4 key tiles (every dQ element summed from several CTAs),
# a window, a single query row with a padded head dim (40 -> 64), and head dim 256 (dK and dV in two launches).
# Head dim 128 runs 128-key CTAs of 8 warps (16 keys each): causal with 300 keys (the last CTA holds 44: warps 3-7
# have none; on the diagonal the first items are seen by the low warps only), a window narrower than a CTA's keys
# (warps skip the items their keys do not see) with GQA at a padded head dim (96 -> 128), and padded head dims
# 72 -> 128 and 136 -> 256.
BWD_CASES = {
    "mqa_causal": (2, 129, 200, 4, 1, 64, True, (-1, -1)),
    "window_d128": (1, 47, 300, 2, 2, 128, False, (60, 10)),
    "one_row_d40": (1, 1, 150, 2, 2, 40, False, (-1, -1)),
    "gqa_d256": (1, 70, 90, 4, 2, 256, True, (-1, -1)),
    "causal_d128_ragged": (1, 200, 300, 2, 2, 128, True, (-1, -1)),
    "window_gqa_d96": (2, 150, 260, 4, 2, 96, False, (30, 7)),
    "d72_bottom_right": (1, 90, 140, 2, 1, 72, True, (-1, -1)),
    "d136": (1, 40, 70, 2, 2, 136, False, (-1, -1)),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", sorted(BWD_CASES))
def test_backward_modes_match_reference(case, deterministic):
    """Both backward modes against the float64 gradients: atomic mode sums dQ in an fp32 workspace from every key
    tile's CTA (zeroed by the delta kernel; the emulated allocator fills it with NaN first), deterministic mode
    runs the separate dq pass."""
    b, sq, sk, hq, hkv, d, causal, window = BWD_CASES[case]
    dtype = torch.bfloat16
    q, k, v = _inputs(b, sq, sk, hq, hkv, d, dtype)
    out, lse = _fwd(q, k, v, 0.0, causal, window)
    g = torch.randn_like(out)
    dq, dk, dv = _bwd(q, k, v, out, lse, g, causal, window, deterministic)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, _ = _ref_attention(q64, k64, v64, 0.0, causal, window)
    ro.backward(g.double())
    for name, a, r in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(a, r, TOL[dtype]["grad"], name)


@pytest.mark.parametrize("d", [64, 128])
def test_backward_modes_varlen_gqa(d):
    """Varlen with GQA, both modes: a 1-query sequence, one over 3 key tiles (2 at d 128: the second one's CTA holds
    22 keys), one without keys (zero gradients). dQ rows of one sequence never receive another's atomics (a query
    tile's padding rows are the next sequence's)."""
    lens_q, lens_k = [1, 130, 40], [64, 150, 0]
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=CUDA)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=CUDA)
    hq, hkv = 4, 2
    q = torch.randn(sum(lens_q), hq, d, device=CUDA).to(torch.float16)
    k = torch.randn(sum(lens_k), hkv, d, device=CUDA).to(torch.float16)
    v = torch.randn(sum(lens_k), hkv, d, device=CUDA).to(torch.float16)
    scale = 1.0 / math.sqrt(d)
    out, lse = torch.ops.pyllmops.flash_attn_fwd(q, k, v, cq, ck, max(lens_q), max(lens_k), scale, 0.0, -1, -1,
                                                 False, False)
    g = torch.randn_like(out)
    grads = {det: torch.ops.pyllmops.flash_attn_bwd(g, q, k, v, out, lse, None, cq, ck, max(lens_q), max(lens_k),
                                                    scale, 0.0, -1, -1, False, det) for det in (False, True)}
    c_q, c_k = cq.tolist(), ck.tolist()
    for s in range(len(lens_q)):
        sq_, sk_ = slice(c_q[s], c_q[s + 1]), slice(c_k[s], c_k[s + 1])
        q64, k64, v64 = (t.detach().double().unsqueeze(0).requires_grad_() for t in (q[sq_], k[sk_], v[sk_]))
        ro, _ = _ref_attention(q64, k64, v64)
        ro.backward(g[sq_].double().unsqueeze(0))
        for det, (dq, dk, dv) in grads.items():
            for name, a, r in (("dq", dq[sq_], q64.grad[0]), ("dk", dk[sk_], k64.grad[0]),
                               ("dv", dv[sk_], v64.grad[0])):
                if r.numel() and r.norm() > 0:
                    assert_close(a, r, TOL[torch.float16]["grad"], f"{name} of sequence {s} (deterministic={det})")
                else:
                    assert (a == 0).all(), f"{name} of sequence {s} must be 0 (deterministic={det})"


def test_deterministic_mode_is_bitwise_reproducible():
    """deterministic=True: two runs give the same bits. On the emulated build the second run uses a random thread
    and block order (the order the atomic mode's fp32 sums depend on)."""
    from conftest import EMULATED
    q, k, v = _inputs(1, 150, 260, 4, 1, 64, torch.bfloat16)  # MQA: every dQ element gets 5 key tiles x 4 heads
    out, lse = _fwd(q, k, v)
    g = torch.randn_like(out)
    runs = []
    for seed in (None, 7):
        if EMULATED and seed is not None:
            from pyllmops._ext import lib
            before = dict(lib().emu_config())
            lib().emu_set_config("random", seed, list(before["breaks"]), before["arch"])
            try:
                runs.append(_bwd(q, k, v, out, lse, g, False, (-1, -1), True))
            finally:
                lib().emu_set_config(before["schedule"], before["seed"], list(before["breaks"]), before["arch"])
        else:
            runs.append(_bwd(q, k, v, out, lse, g, False, (-1, -1), True))
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name} differs between runs"


# ---- the atomic-dQ backward at head dims 65-128: dkdv_dq_kernel's FlashAttention-2 tiles ------------------------
# 128-key CTAs, 64-query items; per warp a 32 x 32 (keys x queries) S / dP tile, 32 keys x 64 columns of dK / dV and
# 32 queries x 32 columns of dQ; P^T and dS^T through shared memory. The cases put sequence ends just before, at and
# after the 32-, 64- and 128-row boundaries (the last item or CTA partly filled, warps with no keys), windows narrower
# than a 32 x 32 warp tile (most warp tiles skipped, the band cutting the rest), GQA / MQA (several heads' items per
# CTA, dQ of one head summed from several CTAs), padded head dims (72: dQ column quarters 2-3 and half of dK / dV's
# second column half are padding; 104: quarter 3 is half padding) and the softcap.
# (batch, sq, sk, hq, hkv, d, causal, window, softcap)
FA2_BWD_CASES = {
    "q63_k129": (1, 63, 129, 2, 2, 128, False, (-1, -1), 0.0),
    "q65_k128_causal": (2, 65, 128, 2, 1, 128, True, (-1, -1), 0.0),
    "q129_k65_causal": (1, 129, 65, 2, 2, 128, True, (-1, -1), 0.0),
    "q128_k127_gqa": (1, 128, 127, 4, 2, 128, False, (-1, -1), 0.0),
    "q64_k257_mqa_causal": (1, 64, 257, 4, 1, 128, True, (-1, -1), 0.0),
    "window_5_3": (1, 130, 200, 2, 2, 128, False, (5, 3), 0.0),
    "window_diag_only": (1, 97, 97, 2, 1, 128, False, (0, 0), 0.0),
    "causal_window_10_gqa": (1, 150, 140, 4, 2, 128, True, (10, -1), 0.0),
    "d72_window": (1, 100, 150, 2, 1, 72, False, (20, 40), 0.0),
    "d104_causal": (1, 129, 129, 2, 2, 104, True, (-1, -1), 0.0),
    "softcap_window_gqa": (1, 70, 160, 4, 2, 128, False, (24, 8), 5.0),
    "softcap_causal_d96": (1, 65, 65, 2, 2, 96, True, (-1, -1), 8.0),
}


@pytest.mark.parametrize("case", sorted(FA2_BWD_CASES))
def test_fa2_tiles_backward_matches_reference(case):
    """The default (atomic-dQ) backward against the float64 gradients of the backward op for its inputs (outputs
    poisoned; the dQ workspace NaN-filled before the delta kernel zeroes it)."""
    b, sq, sk, hq, hkv, d, causal, window, softcap = FA2_BWD_CASES[case]
    q, k, v = _inputs(b, sq, sk, hq, hkv, d, torch.bfloat16, mul=3.0 if softcap else 1.0)
    out, lse = _fwd(q, k, v, softcap, causal, window)
    g = torch.randn_like(out)
    left, right = window
    right = 0 if causal else right
    grads = torch.ops.pyllmops.flash_attn_bwd(g, q, k, v, out, lse, None, None, None, sq, sk, 1.0 / math.sqrt(d),
                                              softcap, left, right, False, False)
    refs = _ref_backward_given_out(q, k, v, out, g, softcap, causal, window)
    for name, a, r in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(a, r, TOL[torch.bfloat16]["grad"], name)


def test_fa2_tiles_backward_varlen():
    """Varlen at head dim 128, causal with a window: sequences of 64, 65 and 130 queries over 129, 63 and 128 keys (a
    sequence's last query tile holds the next one's first rows: their dQ must not receive this sequence's atomics)
    and one without queries (its keys get zero gradients)."""
    lens_q, lens_k = [64, 65, 130, 0], [129, 63, 128, 40]
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=CUDA)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=CUDA)
    hq, hkv, d = 4, 2, 128
    q = torch.randn(sum(lens_q), hq, d, device=CUDA).to(torch.bfloat16)
    k = torch.randn(sum(lens_k), hkv, d, device=CUDA).to(torch.bfloat16)
    v = torch.randn(sum(lens_k), hkv, d, device=CUDA).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    args = (cq, ck, max(lens_q), max(lens_k), scale, 0.0, 50, 0)
    out, lse = torch.ops.pyllmops.flash_attn_fwd(q, k, v, *args, False, False)
    g = torch.randn_like(out)
    dq, dk, dv = torch.ops.pyllmops.flash_attn_bwd(g, q, k, v, out, lse, None, *args, False, False)
    c_q, c_k = cq.tolist(), ck.tolist()
    for s in range(len(lens_q)):
        sq_, sk_ = slice(c_q[s], c_q[s + 1]), slice(c_k[s], c_k[s + 1])
        if lens_q[s] == 0:
            assert (dk[sk_] == 0).all() and (dv[sk_] == 0).all(), f"keys of sequence {s} (no queries) must get 0"
            continue
        refs = _ref_backward_given_out(*(t.unsqueeze(0) for t in (q[sq_], k[sk_], v[sk_], out[sq_], g[sq_])),
                                       causal=True, window=(50, 0))
        for name, a, r in zip(("dq", "dk", "dv"), (dq[sq_], dk[sk_], dv[sk_]), refs):
            assert_close(a, r[0], TOL[torch.bfloat16]["grad"], f"{name} of sequence {s}")
