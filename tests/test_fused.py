"""pyllmops.nn.fused (the decoder's fused norm / activation / rotary / linear+cross-entropy) against float64
formulas: outputs and every gradient, fresh random inputs, outputs poisoned (conftest), bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import pyllmops
from pyllmops.nn import fused
from pyllmops.nn.rotary import RotaryEmbedding, apply_rotary
from pyllmops.ops._common import on_cuda

from conftest import assert_close, devices
from train_fixtures import one_thread  # noqa: F401  (autouse)

TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


# ---- rms_norm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (37, 96), (3, 5, 130)])
def test_rms_norm(dtype, shape):
    x, w = _leaf(shape, dtype, 3.0), _leaf(shape[-1:], dtype)
    eps = 1e-5
    y = fused.rms_norm(x, w, eps)
    assert y.dtype == dtype
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    dy = torch.randn(shape, dtype=torch.float64)
    assert_close(y, ref, TOL[dtype])
    dx, dw = _grads(y, (x, w), dy.to(dtype))
    rdx, rdw = _grads(ref, (x64, w64), dy)
    assert_close(dx, rdx, TOL[dtype] * 4, "dx")
    assert_close(dw, rdw, TOL[dtype] * 4, "dweight")


def test_rms_norm_out_dtype_frozen_weight_and_nan():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16)
    y = fused.rms_norm(x, w, 1e-6, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    (dx,) = torch.autograd.grad(y.float().sum(), (x,))
    assert dx.dtype == torch.float32 and torch.isfinite(dx).all()
    xn = x.detach().clone()
    xn[2, 3] = float("nan")
    yn = fused.rms_norm(xn, w)
    assert torch.isnan(yn[2]).all() and torch.isfinite(yn[[0, 1, 3]]).all()


def test_rms_norm_bad_inputs():
    x, w = torch.randn(3, 8), torch.randn(8)
    with pytest.raises(ValueError, match="weight has 7 elements, expected x's last dim 8"):
        fused.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        fused.rms_norm(x, w, 0)
    with pytest.raises(ValueError, match="x must have dtype"):
        fused.rms_norm(x.long(), w)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fused.rms_norm([1.0], w)


# ---- swiglu --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_swiglu(dtype):
    g, u = _leaf((33, 70), dtype, 4.0), _leaf((33, 70), dtype)
    h = fused.swiglu(g, u)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = g64 / (1 + torch.exp(-g64)) * u64
    assert_close(h, ref, TOL[dtype])
    dh = torch.randn(33, 70, dtype=torch.float64)
    dg, du = _grads(h, (g, u), dh.to(dtype))
    rdg, rdu = _grads(ref, (g64, u64), dh)
    assert_close(dg, rdg, TOL[dtype] * 4, "dgate")
    assert_close(du, rdu, TOL[dtype] * 4, "dup")


def test_swiglu_bad_inputs():
    with pytest.raises(ValueError, match="gate and up must have the same shape and dtype"):
        fused.swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="gate and up must have the same shape and dtype"):
        fused.swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))


# ---- the fused CPU kernels (csrc/fused) behind rms_norm and swiglu -------------------------------------

@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused kernels' calls (the float32 CPU path); composition=True in a test's parametrization forces
    the torch composition instead."""
    from pyllmops._ext import lib
    real = lib()

    class Spy:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if name.startswith("fused_") and callable(attr):
                def wrapped(*a, **kw):
                    calls.append(name)
                    return attr(*a, **kw)
                return wrapped
            return attr
    class Calls(list):
        spy = staticmethod(lambda: Spy())
    calls = Calls()
    monkeypatch.setattr(fused.kernels, "lib", Calls.spy)
    return calls


@pytest.fixture
def threads():
    from pyllmops._ext import lib

    def set_threads(n):
        lib().set_num_threads(n)
    yield set_threads
    lib().set_num_threads(0)


def _kernel_dtypes(device):
    return [torch.float32, torch.bfloat16] if on_cuda(device) else [torch.float32]


@pytest.mark.parametrize("device", devices())
def test_fused_kernels_run_and_match_the_composition(kernel_calls, monkeypatch, device):
    """float32 CPU and float32 / bfloat16 CUDA calls take the kernels (forward and backward), non-contiguous inputs
    included; the torch composition (other dtypes, tracing) gives the same numbers within the dtype's tolerance."""
    for dtype in _kernel_dtypes(device):
        kernel_calls.clear()
        monkeypatch.undo()
        monkeypatch.setattr(fused.kernels, "lib", kernel_calls.spy)
        leaf = (lambda shape, scale=1.0: _leaf(shape, dtype, scale).detach().to(device).requires_grad_())
        q = leaf((4, 50, 72), 2.0).detach().transpose(0, 1).requires_grad_()  # (tokens, heads, d), non-contiguous
        cos, sin = fused.rotary_tables(torch.arange(50, device=device) * 7, 72)
        g, u = leaf((3, 40, 96), 5.0), leaf((3, 40, 96))
        x = leaf((96, 120), 2.0).detach().t().requires_grad_()  # non-contiguous (120, 96)
        w = leaf((96,))
        dh, dy, dq = (torch.randn(sh, device=device).to(dtype) for sh in ((3, 40, 96), (120, 96), (50, 4, 72)))
        h = fused.swiglu(g, u)
        y = fused.rms_norm(x, w, 1e-5)
        r = fused.rotary(q, cos, sin)
        got = _grads(h, (g, u), dh) + _grads(y, (x, w), dy) + _grads(r, (q,), dq)
        assert kernel_calls == ["fused_swiglu_forward", "fused_rms_norm_forward", "fused_rotary",
                                "fused_swiglu_backward", "fused_rms_norm_backward", "fused_rotary"]
        monkeypatch.setattr(fused.kernels, "applies", lambda *ts, **kw: False)
        h2, y2, r2 = fused.swiglu(g, u), fused.rms_norm(x, w, 1e-5), fused.rotary(q, cos, sin)
        want = _grads(h2, (g, u), dh) + _grads(y2, (x, w), dy) + _grads(r2, (q,), dq)
        assert len(kernel_calls) == 6
        for a, b in ((h, h2), (y, y2), (r, r2)):
            assert a.dtype == dtype and a.shape == b.shape
            assert_close(a, b, TOL[dtype])
        for a, b in zip(got, want):
            assert a.dtype == dtype
            assert_close(a, b, 4 * TOL[dtype])


@pytest.mark.parametrize("device", devices())
def test_fused_swiglu_extremes_and_nan(kernel_calls, device):
    """sigmoid over the whole float32 range against float64 (|gate| to 1e4, +-inf), NaN kept where it sits."""
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([1e4, -1e4, 87.0, -87.0, -88.0, -104.0, 0.0, -0.0]),
                   torch.randn(991) * 8])
    g = g.reshape(50, 100).to(device).requires_grad_()
    u = torch.randn(50, 100, device=device, requires_grad=True)
    h = fused.swiglu(g, u)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = g64 * torch.sigmoid(g64) * u64
    assert_close(h, ref, TOL[torch.float32])
    dh = torch.randn(50, 100, dtype=torch.float64, device=device)
    for a, b in zip(_grads(h, (g, u), dh.float()), _grads(ref, (g64, u64), dh)):
        assert_close(a, b, 4 * TOL[torch.float32])
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0], device=device)
    gs = special.clone().requires_grad_()
    us = torch.tensor([2.0, 2.0, 2.0, float("nan")], device=device, requires_grad=True)
    hs = fused.swiglu(gs, us)
    want = torch.nn.functional.silu(special.double()) * us.detach().double()  # inf, nan (-inf * 0), nan, nan
    assert torch.equal(torch.isnan(hs), torch.isnan(want)) and hs[0] == float("inf")
    dgs, dus = _grads(hs, (gs, us), torch.ones(4, device=device))
    assert torch.isnan(dgs[2:]).all() and torch.isnan(dus[2]) and dus[0] == float("inf")
    assert kernel_calls.count("fused_swiglu_forward") == 2


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("d", [8, 15, 16, 130])  # d = 1 is ill-conditioned in float32 (dx ~ eps / x^2)
def test_fused_rms_norm_shapes_threads_and_nan(kernel_calls, threads, device, d):
    """Row lengths around the 16-lane partial sums / a warp, rows across several 64-row dweight chunks; every output
    the same bitwise at 1 and 3 CPU threads (on CUDA: on a second run); a NaN stays in its row (x) or its column
    (dweight)."""
    x = _leaf((203, d), torch.float32, 3.0).detach().to(device).requires_grad_()
    w = _leaf((d,), torch.float32).detach().to(device).requires_grad_()
    dy = torch.randn(203, d, dtype=torch.float64, device=device)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    res = []
    for n in (1, 3):
        threads(n)
        y = fused.rms_norm(x, w)
        res.append((y,) + _grads(y, (x, w), dy.float()))
    for a, b in zip(res[0], res[1]):
        assert torch.equal(a, b)
    assert_close(res[0][0], ref, TOL[torch.float32])
    for a, b in zip(res[0][1:], _grads(ref, (x64, w64), dy)):
        assert_close(a, b, 4 * TOL[torch.float32])
    xn = x.detach().clone()
    xn[5, 0] = float("nan")
    xn.requires_grad_()
    yn = fused.rms_norm(xn, w)
    dxn, dwn = _grads(yn, (xn, w), dy.float())
    rows = torch.arange(203, device=device) != 5
    assert torch.isnan(yn[5]).all() and torch.isfinite(yn[rows]).all()
    assert torch.isnan(dxn[5]).all() and torch.isfinite(dxn[rows]).all() and torch.isnan(dwn).all()
    assert kernel_calls.count("fused_rms_norm_backward") == 3


def test_fused_kernels_recheck_their_operands():
    """The C++ layer re-checks what the kernels walk (the Python layer never sends these)."""
    from pyllmops._ext import lib
    from pyllmops.ops._common import view
    a, b = torch.randn(8, 16), torch.randn(8, 15)
    with pytest.raises(ValueError, match="up must have 128 elements"):
        lib().fused_swiglu_forward(view(a), view(b), view(a), 0)
    with pytest.raises(ValueError, match="out must be float32"):
        lib().fused_swiglu_forward(view(a), view(a), view(a.double()), 0)
    with pytest.raises(ValueError, match="dgate must be contiguous"):
        lib().fused_swiglu_backward(view(a), view(a), view(a), view(torch.randn(16, 8).t()), None, 0)
    with pytest.raises(ValueError, match="rstd must have 8 elements"):
        lib().fused_rms_norm_forward(view(a), view(a[0]), 1e-5, view(a), view(torch.empty(7)), 0)
    with pytest.raises(ValueError, match="eps must be positive and finite in float32"):
        lib().fused_rms_norm_forward(view(a), view(a[0]), 1e-50, view(a), view(torch.empty(8)), 0)
    with pytest.raises(ValueError, match="sin must have 64 elements"):
        lib().fused_rotary(view(a.view(8, 1, 16)), view(torch.empty(8, 8)), view(torch.empty(31)), 1.0,
                           view(a.view(8, 1, 16)), 0)
    with pytest.raises(ValueError, match="sign must be 1 or -1"):
        lib().fused_rotary(view(a.view(8, 1, 16)), view(torch.empty(8, 8)), view(torch.empty(8, 8)), 0.5,
                           view(a.view(8, 1, 16)), 0)
    with pytest.raises(ValueError, match="dw_part must have 16 elements"):
        lib().fused_rms_norm_backward(view(a), view(a), view(a[0]), view(torch.empty(8)), None,
                                      view(torch.empty(2, 16)), 0)


# ---- rotary --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [8, 64, 130])
def test_rotary(dtype, head_dim):
    tokens, heads, base = 29, 3, 10000.0
    pos = torch.randint(0, 5000, (tokens,))
    x = _leaf((tokens, heads, head_dim), dtype)
    cos, sin = fused.rotary_tables(pos, head_dim, base)
    y = fused.rotary(x, cos, sin)
    assert y.dtype == dtype
    # float64 formula: pairs (i, i + d/2) rotated by angle pos * base^(-2i/d)
    x64 = x.detach().double().requires_grad_()
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = (pos.double()[:, None] * inv)[:, None, :]
    x1, x2 = x64[..., :head_dim // 2], x64[..., head_dim // 2:]
    ref = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    # positions up to 5000: float32 angles carry ~2.5e-4 rad of rounding, as RotaryEmbedding's do
    tol = max(TOL[dtype], 1e-4)
    assert_close(y, ref, tol)
    dy = torch.randn(x.shape, dtype=torch.float64)
    (dx,) = _grads(y, (x,), dy.to(dtype))
    (rdx,) = _grads(ref, (x64,), dy)
    assert_close(dx, rdx, tol * 2, "dx")
    if dtype == torch.float32:  # the same numbers as the module it replaces in the decoder
        c, s = RotaryEmbedding(head_dim, base)(pos)
        assert_close(y, apply_rotary(x.detach(), c, s), 1e-6, "vs nn.rotary.apply_rotary")


def test_rotary_bad_inputs():
    pos = torch.arange(4)
    cos, sin = fused.rotary_tables(pos, 8)
    with pytest.raises(ValueError, match="cos must have shape"):
        fused.rotary(torch.randn(4, 2, 16), cos, sin)
    with pytest.raises(ValueError, match="x must be 3-D"):
        fused.rotary(torch.randn(4, 8), cos, sin)
    with pytest.raises(ValueError, match="head_dim must be an even int >= 2, got 7"):
        fused.rotary_tables(pos, 7)
    with pytest.raises(ValueError, match="positions must have dtype"):
        fused.rotary_tables(pos.float(), 8)


# ---- linear_cross_entropy ------------------------------------------------------------------------------

def _ref_lce(h, w, t):
    n = (t != -100).sum().clamp(min=1)
    return F.cross_entropy(h @ w.t(), t, ignore_index=-100, reduction="sum") / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden,vocab,chunk", [(1, 8, 5, None), (37, 24, 300, 8), (64, 32, 1000, 7),
                                                      (50, 16, 77, 64)])
def test_linear_cross_entropy(dtype, tokens, hidden, vocab, chunk):
    h, w = _leaf((tokens, hidden), dtype), _leaf((vocab, hidden), dtype, 0.5)
    t = torch.randint(0, vocab, (tokens,))
    t[torch.rand(tokens) < 0.3] = -100
    loss = fused.linear_cross_entropy(h, w, t, chunk_rows=chunk)
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.shape == ()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _ref_lce(h64, w64, t)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert_close(loss, ref, tol)
    scale = torch.tensor(1.7, dtype=torch.float64)  # the incoming gradient scales the stored ones
    dh, dw = _grads(loss, (h, w), scale.to(loss.dtype))
    rdh, rdw = _grads(ref, (h64, w64), scale)
    assert_close(dh, rdh, tol, "dh")
    assert_close(dw, rdw, tol, "dweight")


def test_linear_cross_entropy_only_h_grad_all_ignored_and_nan():
    h, w = _leaf((10, 8), torch.float32), torch.randn(20, 8)
    t = torch.randint(0, 20, (10,))
    loss = fused.linear_cross_entropy(h, w, t, chunk_rows=3)
    (dh,) = torch.autograd.grad(loss, (h,))
    h64 = h.detach().double().requires_grad_()
    (rdh,) = torch.autograd.grad(_ref_lce(h64, w.double(), t), (h64,))
    assert_close(dh, rdh, 1e-5, "dh")
    none = torch.full((10,), -100)  # nothing counts: 0 with zero gradients, as sft_loss
    loss0 = fused.linear_cross_entropy(h, w, none)
    (dh0,) = torch.autograd.grad(loss0, (h,))
    assert loss0.item() == 0 and torch.equal(dh0, torch.zeros_like(dh0))
    hn = h.detach().clone()
    hn[4, 1] = float("nan")
    assert torch.isnan(fused.linear_cross_entropy(hn, w, t))
    with torch.no_grad():  # no gradient buffers without grad
        assert_close(fused.linear_cross_entropy(h, w, t), _ref_lce(h.double(), w.double(), t), 1e-5)


def test_linear_cross_entropy_bad_inputs():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"targets\[2\] = 10 is outside the vocabulary \[0, 10\)"):
        fused.linear_cross_entropy(h, w, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match=r"targets\[0\] = -5 is outside"):
        fused.linear_cross_entropy(h, w, torch.tensor([-5, 2, 1, 1]))
    with pytest.raises(ValueError, match="weight must be \\(vocab, hidden=8\\)"):
        fused.linear_cross_entropy(h, torch.randn(10, 9), t)
    with pytest.raises(ValueError, match="targets has 3 entries, expected one per row of h \\(4\\)"):
        fused.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="targets must have dtype"):
        fused.linear_cross_entropy(h, w, t.int())
    with pytest.raises(ValueError, match="chunk_rows must be a positive int, got 0"):
        fused.linear_cross_entropy(h, w, t, chunk_rows=0)


# ---- the decoder's loss --------------------------------------------------------------------------------

def _tiny():
    model = pyllmops.models.Decoder(pyllmops.models.DecoderConfig(hidden_size=64, intermediate_size=96, num_layers=2,
                                                                  num_heads=4, num_kv_heads=2, initializer_range=0.2))
    pyllmops.apply_lora(model, r=4, alpha=8, target_modules=list(pyllmops.models.PROJECTIONS))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def _adapter_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def test_decoder_loss_matches_logits_path():
    """Decoder.loss == cross-entropy on forward()'s logits, shifted per sequence, with -100 labels (transformers'
    labels convention); the same adapter gradients. Batched and packed layouts."""
    from pyllmops.train.losses import sft_loss

    model = _tiny()
    ids = torch.randint(0, 259, (3, 20))
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt
    loss, grads = _adapter_grads(model, model.loss(ids, labels))
    logits = model(ids)
    ref, rgrads = _adapter_grads(model, sft_loss(logits[:, :-1].reshape(-1, 259), labels[:, 1:].reshape(-1)))
    assert_close(loss, ref, 1e-6)
    for g, rg in zip(grads, rgrads):
        assert_close(g, rg, 1e-5, "adapter grad")
    # packed: sequences of 5, 1 and 14 tokens; a 1-token sequence predicts nothing
    lengths = [5, 1, 14]
    flat = torch.randint(0, 259, (20,))
    cu = torch.tensor([0, 5, 6, 20], dtype=torch.int32)
    loss_p = model.loss(flat, cu_seqlens=cu)
    lg = model(flat, cu_seqlens=cu)
    parts, tg, start = [], [], 0
    for n in lengths:
        parts.append(lg[start:start + n - 1])
        tg.append(flat[start + 1:start + n])
        start += n
    assert_close(loss_p, sft_loss(torch.cat(parts), torch.cat(tg)), 1e-6, "packed loss")


def test_decoder_target_loss_matches_sft_loss():
    """Decoder.target_loss (what train.sft runs on an unwrapped Decoder) == sft_loss on forward()'s logits with
    the same pre-aligned targets, loss and adapter gradients; bad targets are refused by name."""
    from pyllmops.train.losses import sft_loss

    model = _tiny()
    flat = torch.randint(0, 259, (20,))
    cu = torch.tensor([0, 5, 6, 20], dtype=torch.int32)
    targets = torch.randint(0, 259, (20,))
    targets[torch.tensor([0, 1, 4, 5, 19])] = -100
    loss, grads = _adapter_grads(model, model.target_loss(flat, targets, cu))
    ref, rgrads = _adapter_grads(model, sft_loss(model(flat, cu_seqlens=cu), targets))
    assert_close(loss, ref, 1e-6)
    for g, rg in zip(grads, rgrads):
        assert_close(g, rg, 1e-5, "adapter grad")
    with pytest.raises(ValueError, match="targets has 19 entries"):
        model.target_loss(flat, targets[:19], cu)
    with pytest.raises(ValueError, match="targets must have dtype in"):
        model.target_loss(flat, targets.int(), cu)


def test_decoder_loss_bad_labels():
    model = _tiny()
    ids = torch.randint(0, 259, (2, 6))
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model.loss(ids, ids[:, :5])
    bad = ids.clone()
    bad[1, 3] = 400
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.loss(ids, bad)


# ---- the model-level benchmark (quick configuration) ---------------------------------------------------

def test_bench_model_breakdown_and_row():
    """The per-part breakdown names where the step's time goes (every part measured, the parts within the
    step); the bench row records both providers or the peer's import error, and ours always."""
    from pyllmops.bench import model as bench_model
    from pyllmops.bench.harness import Bench

    res = bench_model.breakdown(quick=True, steps=1)
    step_ms = res.pop("step_ms")
    assert step_ms > 0 and set(res) == set(bench_model.PARTS) | {"other"}
    for part in ("LoRA/QLoRA layers, forward (NF4 decode + GEMMs)", "attention, backward",
                 "lm_head + cross-entropy (fused), forward and backward", "RMSNorm, forward and backward"):
        assert res[part] > 0, part
    assert sum(res.values()) <= 1.5 * step_ms  # profiler overhead aside, the parts do not nest
    bench = Bench("model", "cpu", quick=True, progress=False)
    bench_model.run(bench)
    rows = {r["provider"]: r for r in bench.rows}
    assert rows["pyllmops"]["median_ms"] > 0 and rows["pyllmops"]["trainable_params"] > 0
    peer = rows["transformers + peft + bitsandbytes + SDPA"]
    assert "error" in peer or peer["trainable_params"] == rows["pyllmops"]["trainable_params"]
