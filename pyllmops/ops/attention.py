"""Flash attention, forward and backward, with causal, sliding-window and GQA masks.

Ops (torch.ops.pyllmops.*), in the order: schema + kernel, fake, autograd:
  flash_attn_fwd(q, k, v, cu_seqlens_q?, cu_seqlens_k?, max_seqlen_q, max_seqlen_k, softmax_scale, softcap,
                 window_left, window_right, top_left, deterministic) -> (out, lse)
  flash_attn_bwd(dout, q, k, v, out, lse, dlse?, cu_seqlens_q?, cu_seqlens_k?, ...) -> (dq, dk, dv)
Public API: flash_attention, flash_attention_varlen (scaled_dot_product_attention is in pyllmops.nn.functional).

Layouts: q (batch, seqlen_q, heads_q, d), k/v (batch, seqlen_k, heads_kv, d) with any batch / seq / head
strides (d contiguous), or varlen (total, heads, d) + cu_seqlens. out has q's layout (empty_like), lse
is float32 (batch, heads_q, seqlen_q), or (heads_q, total_q) for varlen. Kernel design: csrc/attention.

Varlen validation. CPU offsets are checked before any kernel runs (ValueError). CUDA offsets live on the
device: reading them here would synchronize every call (and break CUDA-graph capture), so only what the
host knows is checked here (rows <= batch * max_seqlen); the kernels check each sequence themselves, write
NaN to every output row of a sequence they cannot honour (longer than max_seqlen, or malformed offsets)
and raise bits in the per-device error word that check_kernel_errors() reads; validate=True checks the
offsets eagerly instead (one synchronization).
"""
import collections
import functools
import math
import os
from typing import Optional

import torch

from pyllmops._ext import lib
from pyllmops.ops._common import (check_bool, check_int, check_tensor, empty, empty_like, error_word, on_cuda,
                                  opt_view, plain_eager, register_error_word, stream, view)
from pyllmops.ops._common import check_kernel_errors  # noqa: F401  (covers every family)

MAX_HEAD_DIM = 256  # csrc/attention/attention.h kMaxHeadDim
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float16, torch.bfloat16)

# CUDA error word (csrc/attention/attention.h): [0] bits, [1] 1 + first reported sequence, [2] its bit,
# [3] c[b], [4] c[b + 1], [5] the limit it broke (max_seqlen, or total rows for malformed offsets).
_ERROR_WORDS = 6
_ERR_BITS = {1: "a sequence of cu_seqlens_q is longer than max_seqlen_q",
             2: "a sequence of cu_seqlens_k is longer than max_seqlen_k",
             4: "cu_seqlens_q is not 0 = cu_seqlens_q[0] <= cu_seqlens_q[1] <= ... <= cu_seqlens_q[-1] = total_q",
             8: "cu_seqlens_k is not 0 = cu_seqlens_k[0] <= cu_seqlens_k[1] <= ... <= cu_seqlens_k[-1] = total_k"}


def _describe_errors(e):
    bits, first, bit, lo, hi, limit = e[:_ERROR_WORDS]
    msg = ("flash_attention_varlen wrote NaN to the outputs of sequences it could not honour: "
           + "; ".join(m for b, m in _ERR_BITS.items() if bits & b))
    if first:
        b, x = first - 1, "q" if bit in (1, 4) else "k"
        name = f"cu_seqlens_{x}"
        offsets = f"{name}[{b}] = {lo}, {name}[{b + 1}] = {hi}"
        msg += (f" (first reported: sequence {b} has length {hi - lo} ({offsets}) > max_seqlen_{x} = {limit})"
                if bit in (1, 2) else f" (first reported: sequence {b}: {offsets}, total_{x} = {limit})")
    return msg + ". flash_attention_varlen(..., validate=True) checks the offsets before the launch (synchronizes)"


register_error_word("attention", _ERROR_WORDS, _describe_errors)


def _last_dim_contiguous(t):
    """Inputs and the layout outputs copy (empty_like): head_dim must be contiguous. Used by the fake
    kernels too, so it must not read data pointers."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _kernel_input(t):
    """An input as the kernel reads it: on CUDA also 16-byte aligned rows (data pointer and every other
    stride a multiple of 8 elements) for the vector loads, else one copy. Outputs made by empty_like of a
    head_dim-contiguous tensor always qualify (fresh allocation; strides of a dense tensor are multiples
    of head_dim, itself a multiple of 8; a non-dense one gets contiguous strides)."""
    if on_cuda(t) and (t.data_ptr() % 16 != 0 or any(s % 8 != 0 for s in t.stride()[:-1])):
        return t.contiguous()
    return t


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


# ================================ CPU: torch's kernel where it computes faster ================================
# The CPU kernel (csrc/attention/attention_cpu.cpp) is a register-blocked tile kernel whose tile products run as fast
# per FLOP as torch's own CPU flash attention (MKL GEMMs on 512-key blocks) in float32; torch's kernel is faster in
# bfloat16 / float16, where it multiplies in that dtype and ours converts to float32. The ops therefore hand bf16 /
# fp16 calls without a window to torch's kernel (aten._scaled_dot_product_flash_attention_for_cpu and its backward),
# after all of pyllmops' argument checks, and so a float32 backward that would take the two-pass backward (seven
# tile products per pair to torch's five; _float32_on_kernel). Every other call runs pyllmops' kernel, and so do
# those torch's cannot take within the contract: the logit softcap, sliding windows (only the band is visited),
# bottom-right causal masks with seqlen_q != seqlen_k, empty rows, non-finite inputs (pyllmops' NaN policy,
# docs/attention.md), a backward through the returned lse, and a backward at |lse| > 32, where rebuilding P from a
# float32 lse loses accuracy (torch's dv error is 0.5 at softmax_scale 1e5; ours recomputes the row statistics).
# docs/attention.md lists the routes with their measured ratios. PYLLMOPS_ATTENTION_CPU=kernel turns the route off
# (tests compare both paths).
_SDPA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SDPA_MAX_LSE = 32.0
_SDPA_MAX_VARLEN_BATCH = 64  # one torch call per sequence: beyond this many, Python overhead outweighs the gain


# The kernel each CPU call ran: {(direction "fwd" / "bwd", "torch" / "pyllmops"): calls}, counted at every exit of
# the ops' CPU bodies. `bench attention` resets it around a row and prints which kernel pyllmops' side ran.
route_counts = collections.Counter()


def _ran(direction, q, torch_kernel):
    if q.device.type == "cpu" and not on_cuda(q):
        route_counts[direction, "torch" if torch_kernel else "pyllmops"] += 1


def _route_enabled():
    return os.environ.get("PYLLMOPS_ATTENTION_CPU", "auto") != "kernel"


def _nan_policy_ok(causal, *ts):
    """Whether torch's kernel may take these inputs: only finite ones (one pass each; a non-finite input sends the
    call to pyllmops' kernel). Measured: with a causal mask torch computes masked pairs inside its blocks and spreads a
    NaN through 0 * NaN (a NaN key reaches the rows before it); the fuzz suite found a NaN q row turned into numbers
    in full attention too. `causal` is kept for the call sites' readability."""
    return all(math.isfinite(_max_abs(t)) for t in ts)


def _max_abs(t):
    """max |t| (NaN if t holds one), one single-threaded pass in _C (a torch reduction starts a parallel region,
    which costs more than the pass on a busy machine). A view whose elements overlap (an expanded tensor: stride 0)
    is read as the run of memory it spans instead, a superset of its elements no larger than its storage (q
    expanded to batch 2**40 would otherwise be a pass of 2**40 rows): the callers only compare the maximum against
    a bound, and a larger one merely keeps the call on pyllmops' kernel."""
    if t.numel() > 0:
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        if span < t.numel():
            t = t.as_strided((span,), (1,))
    return lib().attention_max_abs(view(t))


def _sdpa_mask_ok(left, right, top_left, sq, sk):
    """Full attention, or causal with the diagonal through (0, 0) (top-left, or sq == sk): torch's is_causal."""
    if left != -1 or right not in (-1, 0):
        return False
    return right == -1 or top_left or sq == sk


def _sdpa_eligible(q, k, softcap, left, right, top_left):
    return (_route_enabled() and q.device.type == "cpu" and not on_cuda(q) and q.dtype in _SDPA_DTYPES
            and softcap == 0.0 and q.shape[-2] > 0 and left == -1 and right in (-1, 0))


def _float32_on_kernel(q, k, cu_seqlens_q, max_seqlen_q, backward):
    """float32 calls stay on pyllmops' kernel. Causal: it visits only the key tiles on or below the diagonal and its
    backward does five tile products per pair in one pass, where torch's CPU kernel computes whole 512-key blocks
    (the masked half of a 512-token causal call included): forward 1.13-1.38x SDPA, forward+backward 1.18-1.38x.
    Full attention: the same tile products as torch's (the micro-kernel is as fast per FLOP as its MKL GEMMs) with
    no finiteness pass over the inputs before the call (the kernel flags non-finite tiles as it loads them) and, for
    varlen, one call for all sequences: 1.03-1.24x SDPA (bench, 64-byte aligned tiles) where the route to torch's
    kernel read 0.93-0.98 (b1, h4 and GQA 8:2, d64, s512-2048, one thread, docs/attention.md). Not bf16 / fp16:
    torch's kernel runs bf16 / fp16 GEMMs where ours converts to float32 (bf16 causal forward: ours 0.45-0.59x).
    The backward only when it takes its single pass (enough (sequence, kv head) tasks for the threads; the two-pass
    backward does seven tile products)."""
    if q.dtype != torch.float32:
        return False
    if not backward:
        return True
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    seqlen = max_seqlen_q if varlen else q.shape[1]
    return lib().attention_cpu_single_pass_backward(batch, q.shape[-2], k.shape[-2], seqlen, q.shape[-1])


def _varlen_lengths(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _varlen_route_ok(spans, right):
    if len(spans) > _SDPA_MAX_VARLEN_BATCH:
        return False
    for q0, q1, k0, k1 in spans:
        if q1 > q0 and (k1 == k0 or (right == 0 and q1 - q0 != k1 - k0)):
            return False  # rows that see no key, or a bottom-right causal mask torch's is_causal cannot express
    return True


@functools.lru_cache(maxsize=None)
def _native_gqa():
    """Whether torch's CPU flash kernel takes fewer k/v heads than q heads itself (torch 2.13 does; older versions
    get k/v repeated per group, as SDPA's enable_gqa does)."""
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False)
        return True
    except Exception:
        return False


def _expand_kv(t, group):
    return t if group == 1 or _native_gqa() else t.repeat_interleave(group, dim=-2)


def _as_promised(result, like=None):
    """result in the layout the fake kernels promise: empty_like(like)'s (q's own when q is dense), or contiguous
    when like is None. Returned as it is when it has it (torch's kernel writes its output in q's layout and its
    gradients contiguous: no allocation, no copy), else copied."""
    if like is None:
        return result.contiguous()
    if result.stride() == like.stride():
        return result
    dst = torch.empty_like(like)
    return result if result.stride() == dst.stride() else dst.copy_(result)


def _sdpa_fwd_dense(q, k, v, scale, causal):
    """q (b, s, h, d) etc. -> (out in q's layout, lse (b, h, s))."""
    group = q.shape[-2] // k.shape[-2]
    k, v = _expand_kv(k, group), _expand_kv(v, group)
    o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), 0.0, causal, scale=scale)[:2]
    return _as_promised(o.transpose(-3, -2), q), _as_promised(l)


def _sdpa_bwd_dense(dout, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv), contiguous."""
    group = q.shape[-2] // k.shape[-2]
    ke, ve = _expand_kv(k, group), _expand_kv(v, group)
    t = (lambda x: x.transpose(-3, -2))
    gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        t(dout), t(q), t(ke), t(ve), t(out), lse.contiguous(), 0.0, causal, scale=scale)
    gk, gv = t(gk), t(gv)
    if group > 1 and not _native_gqa():
        gk = gk.unflatten(-2, (k.shape[-2], group)).sum(-2)
        gv = gv.unflatten(-2, (k.shape[-2], group)).sum(-2)
    return _as_promised(t(gq)), _as_promised(gk), _as_promised(gv)


# ================================ torch.library ops ================================
@torch.library.custom_op("pyllmops::flash_attn_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                    cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                    softcap: float, window_left: int, window_right: int, top_left: bool,
                    deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    varlen = cu_seqlens_q is not None
    route = (_sdpa_eligible(q, k, softcap, window_left, window_right, top_left)  # CPU only
             and not _float32_on_kernel(q, k, cu_seqlens_q, max_seqlen_q, backward=False)
             and _nan_policy_ok(window_right == 0, q, k, v))
    if route and not varlen and q.shape[1] > 0 and k.shape[1] > 0 and _sdpa_mask_ok(
            window_left, window_right, top_left, q.shape[1], k.shape[1]):
        _ran("fwd", q, True)
        return _sdpa_fwd_dense(q, k, v, softmax_scale, window_right == 0)
    # Allocated before a kernel reads the inputs: an input too large for memory (an expanded view) fails here, not
    # in a sweep over its elements (the route's finiteness pass reads such a view through its span: _max_abs).
    out = empty_like(q)  # q's layout, as the fake kernel promises
    lse = empty(_lse_shape(q, varlen), torch.float32, q.device)
    # Copies (if any) are bound to names: a view tuple holds only the data pointer, so a temporary would
    # be freed (and its memory reused) before the kernel reads it.
    q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
    if route and varlen:
        spans = _varlen_lengths(cu_seqlens_q, cu_seqlens_k)
        if _varlen_route_ok(spans, window_right):
            lse.fill_(-math.inf)  # sequences without queries have no rows; none without keys is routed
            for q0, q1, k0, k1 in spans:
                if q1 > q0:
                    o, l = _sdpa_fwd_dense(q[q0:q1].unsqueeze(0), k[k0:k1].unsqueeze(0),
                                           v[k0:k1].unsqueeze(0), softmax_scale, window_right == 0)
                    out[q0:q1].copy_(o[0])
                    lse[:, q0:q1].copy_(l[0])
            _ran("fwd", q, True)
            return out, lse
    _ran("fwd", q, False)
    lib().attention_forward(view(q), view(k), view(v), view(out), view(lse), opt_view(cu_seqlens_q),
                            opt_view(cu_seqlens_k), opt_view(error_word("attention", q.device)), max_seqlen_q,
                            max_seqlen_k, softmax_scale, softcap, window_left, window_right, top_left, stream(q))
    return out, lse


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, window_left,
      window_right, top_left, deterministic):
    q = _last_dim_contiguous(q)
    return torch.empty_like(q), q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)


@torch.library.custom_op("pyllmops::flash_attn_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def _flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                    cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                    softmax_scale: float, softcap: float, window_left: int, window_right: int,
                    top_left: bool, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out, dout = _last_dim_contiguous(out), _last_dim_contiguous(dout)
    causal = window_right == 0
    route = (_sdpa_eligible(q, k, softcap, window_left, window_right, top_left)  # CPU only
             and not _float32_on_kernel(q, k, cu_seqlens_q, max_seqlen_q, backward=True)
             and (dlse is None or _max_abs(dlse) == 0)
             and lse.numel() > 0 and _max_abs(lse) <= _SDPA_MAX_LSE
             and _nan_policy_ok(causal, q, k, v, dout))
    if route and cu_seqlens_q is None and _sdpa_mask_ok(window_left, window_right, top_left, q.shape[1], k.shape[1]):
        _ran("bwd", q, True)
        return _sdpa_bwd_dense(dout, q, k, v, out, lse.contiguous(), softmax_scale, causal)
    # Contiguous gradients, as the fake kernel promises: the layout torch's CPU kernel returns (the route above needs
    # no copy) and one the kernels write as fast as any (they take strides). Allocated before a kernel reads the
    # inputs (see _flash_attn_fwd).
    dq, dk, dv = (empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    # Copies are bound to names: a view tuple holds only the data pointer (see _flash_attn_fwd).
    q, k, v = _kernel_input(q), _kernel_input(k), _kernel_input(v)
    out, dout = _kernel_input(out), _kernel_input(dout)
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    if q.shape[-2] == 0:  # no query head: nothing reaches k and v (the CUDA backward launches nothing then)
        return dq, dk.zero_(), dv.zero_()
    delta = empty(lse.shape, torch.float32, q.device)
    if route and cu_seqlens_q is not None:
        spans = _varlen_lengths(cu_seqlens_q, cu_seqlens_k)
        if _varlen_route_ok(spans, window_right):
            dk.zero_()
            dv.zero_()
            for q0, q1, k0, k1 in spans:
                if q1 > q0:
                    u = (lambda x, a, b: x[a:b].unsqueeze(0))
                    gq, gk, gv = _sdpa_bwd_dense(u(dout, q0, q1), u(q, q0, q1), u(k, k0, k1), u(v, k0, k1),
                                                 u(out, q0, q1), lse[:, q0:q1].unsqueeze(0), softmax_scale, causal)
                    dq[q0:q1].copy_(gq[0])
                    dk[k0:k1].copy_(gk[0])
                    dv[k0:k1].copy_(gv[0])
            _ran("bwd", q, True)
            return dq, dk, dv
    _ran("bwd", q, False)
    lib().attention_backward(view(q), view(k), view(v), view(out), view(dout), view(lse),
                             opt_view(dlse), view(delta), view(dq), view(dk),
                             view(dv), opt_view(cu_seqlens_q), opt_view(cu_seqlens_k),
                             opt_view(error_word("attention", q.device)), max_seqlen_q, max_seqlen_k,
                             softmax_scale, softcap, window_left, window_right, top_left, deterministic,
                             stream(q))
    return dq, dk, dv


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, softcap,
      window_left, window_right, top_left, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, softcap, left, right, top_left, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.meta = (max_q, max_k, scale, softcap, left, right, top_left, deterministic)


def _fwd_backward(ctx, dout, dlse, bwd=None):
    """Gradients of (out, lse) through `bwd` (default: the registered flash_attn_bwd op). dout is None when only
    the lse was differentiated and the caller does not materialize gradients (_FlashAttnEager)."""
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = (bwd or torch.ops.pyllmops.flash_attn_bwd)(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.meta)
    return (dq, dk, dv) + (None,) * 10


_flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


class _FlashAttnEager(torch.autograd.Function):
    """The registered op's forward and backward, called without the dispatcher in plain eager mode (the custom
    op's autograd wrapper and redispatch cost ~0.1 ms a call: 5% of a 512-token CPU forward, which torch's own
    kernel runs in ~2 ms). Under torch.compile, dispatch modes or meta tensors the registered op runs
    (ops._common.plain_eager)."""

    @staticmethod
    def forward(ctx, *args):
        output = _flash_attn_fwd._init_fn(*args)
        _fwd_setup(ctx, args, output)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient (None: no lse term)
        return output

    @staticmethod
    def backward(ctx, dout, dlse):
        return _fwd_backward(ctx, dout, dlse, _flash_attn_bwd._init_fn)


def _attn_fwd(*args):
    """flash_attn_fwd(*args): in plain eager mode the op body itself when nothing needs a gradient (inference: no
    autograd node to build), else through _FlashAttnEager; outside plain eager mode the registered op."""
    if not plain_eager(args[0]):
        return torch.ops.pyllmops.flash_attn_fwd(*args)
    if torch.is_grad_enabled() and (args[0].requires_grad or args[1].requires_grad or args[2].requires_grad):
        return _FlashAttnEager.apply(*args)
    return _flash_attn_fwd._init_fn(*args)


# ================================ argument checks ================================
def _check_qkv(q, k, v, varlen):
    dims = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    check_tensor("q", q, dim=dims)
    dtypes = CUDA_DTYPES if on_cuda(q) else CPU_DTYPES
    check_tensor("q", q, dtypes=dtypes)
    check_tensor("k", k, dtypes=(q.dtype,), dim=dims, device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), dim=dims, device=q.device)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape {layout}, got {tuple(k.shape)} and {tuple(v.shape)}")
    d = q.shape[-1]
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"k must have q's head_dim {d}, got k.shape = {tuple(k.shape)}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hkv}) (GQA/MQA), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    for name, t in (("q", q), ("k", k)):  # int32 positions, as FlashAttention: 2**31 rows would run for days anyway
        rows = t.shape[0] if varlen else t.shape[1]
        if rows > MAX_ROWS:
            raise ValueError(f"{name} has {rows} {'rows' if varlen else 'positions (seqlen)'}, more than the "
                             f"{MAX_ROWS} (2**31 - 1) a sequence axis may hold, got {name}.shape = {tuple(t.shape)}")
    if not varlen:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]}")
        if q.shape[0] < 1 or q.shape[1] < 1 or k.shape[1] < 1:
            raise ValueError(f"batch, seqlen_q and seqlen_k must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _window(causal, window_size, seqlen_q, seqlen_k):
    """(left, right) for the kernels: causal sets right = 0, and a bound of at least seqlen_q + seqlen_k (no query is
    that far from any key, whatever the diagonal) is unbounded, -1, so that any int is accepted (10**30 too) and
    nothing overflows int64 in the mask arithmetic."""
    check_bool("causal", causal)
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1, got {window_size!r}")
    left, right = window_size
    check_int("window_size[0]", left, min_value=-1)
    check_int("window_size[1]", right, min_value=-1)
    if causal:
        right = 0
    far = seqlen_q + seqlen_k
    return (-1 if left >= far else left), (-1 if right >= far else right)


# float32 max / log2(e): the kernels use softmax_scale * log2(e) in float32 (csrc/attention/attention_bindings.cpp).
MAX_SOFTMAX_SCALE = 2.3589112e38
MAX_ROWS = 2**31 - 1  # seqlen (dense) or total rows (varlen) of q and k
_FLOAT32_MAX = 3.4028234663852886e38


def _softmax_scale(softmax_scale, head_dim, name="softmax_scale"):
    """1 / sqrt(head_dim) when None; else a number > 0 that stays positive and finite in float32, also times log2(e).
    `name` is the caller's argument name (the SDPA drop-in calls it `scale`)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__} {softmax_scale!r}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and 0 < scale <= MAX_SOFTMAX_SCALE) or torch.tensor(scale).item() == 0:
        raise ValueError(f"{name} must be > 0 and at most {MAX_SOFTMAX_SCALE:.5g} (positive and finite in "
                         f"float32, also after the kernels multiply it by log2(e)), got {softmax_scale!r}")
    return scale


def _softcap(softcap):
    """The logit softcap: 0 (off) or a positive number finite in float32."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0.0 = off), got {type(softcap).__name__} {softcap!r}")
    cap = float(softcap)
    if not (math.isfinite(cap) and 0 <= cap <= _FLOAT32_MAX):
        raise ValueError(f"softcap must be 0 (off) or positive and finite in float32 (at most {_FLOAT32_MAX:.5g}), "
                         f"got {softcap!r}")
    return cap


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, validate):
    for name, c in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, c, dtypes=(torch.int32,), dim=1, device=q.device)
        if c.shape[0] < 2:
            raise ValueError(f"{name} must have batch + 1 >= 2 entries, got shape {tuple(c.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    check_int("max_seqlen_q", max_seqlen_q, min_value=0)
    check_int("max_seqlen_k", max_seqlen_k, min_value=0)
    batch = cu_seqlens_q.shape[0] - 1
    for x, total, mx in (("q", q.shape[0], max_seqlen_q), ("k", k.shape[0], max_seqlen_k)):
        if total > batch * mx:  # free: the lengths sum to the rows
            raise ValueError(f"{x} has {total} rows for {batch} sequences of at most max_seqlen_{x} = {mx} rows: "
                             f"some sequence of cu_seqlens_{x} is longer than max_seqlen_{x}")
    if (on_cuda(q) and not validate) or q.device.type == "meta":
        return  # reading the offsets would synchronize (meta tensors have none): the kernels check them (docstring)
    for name, c, total, mx in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                               ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        vals = c.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
        lens = [b - a for a, b in zip(vals, vals[1:])]
        if min(lens) < 0:
            b = lens.index(min(lens))
            raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {vals[b]} then {name}[{b + 1}] = "
                             f"{vals[b + 1]}")
        if vals[-1] != total:
            raise ValueError(f"{name}[-1] = {vals[-1]} must equal the {total} rows of {name[-1]}")
        if max(lens) > mx:
            b = lens.index(max(lens))
            raise ValueError(f"sequence {b} of {name} has length {lens[b]} ({name}[{b}] = {vals[b]}, "
                             f"{name}[{b + 1}] = {vals[b + 1]}) > max_seqlen_{name[-1]} = {mx}")


# ================================ public API ================================
def flash_attention(q, k, v, *, causal=False, window_size=(-1, -1), softmax_scale=None, softcap=0.0,
                    deterministic=False, return_lse=False):
    """softmax(q k^T * softmax_scale + mask) v, computed tile by tile (FlashAttention-2); differentiable.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), heads_q a
            multiple of heads_kv (GQA / MQA: query head h uses kv head h // (heads_q // heads_kv)).
            head_dim a multiple of 8 up to 256. Any batch / seq / head strides (head_dim contiguous), so a
            (batch, heads, seqlen, head_dim) tensor passed as x.transpose(1, 2) is not copied.
            dtypes: float16 / bfloat16 on CUDA; float32 / bfloat16 / float16 on CPU.
        causal: mask aligned bottom-right when seqlen_q != seqlen_k (FlashAttention): sets right = 0.
        window_size: (left, right): query i sees key j iff i + sk - sq - left <= j <= i + sk - sq + right;
            -1 is unbounded, and so is any bound >= seqlen_q + seqlen_k. A query that sees no key outputs 0
            (lse -inf) and gets zero gradients.
        softmax_scale: default 1 / sqrt(head_dim); at most 2.3589e38 (finite in float32 times log2(e)).
        softcap: logit softcap (Gemma 2): the scores s = softmax_scale * q.k become softcap * tanh(s / softcap)
            before the mask and the softmax; 0.0 (default) is off. CPU and CUDA.
        deterministic: as FlashAttention's. On CUDA the default backward sums dQ with fp32 atomics (the
            5-matmul FlashAttention-2 structure; the order of the additions varies between runs, so dq can
            differ in the last bits); True runs the two-pass backward in which every gradient element has a
            single writer (bitwise reproducible, ~1.4x the backward's tile matmuls). The CPU backward is
            always deterministic.
        return_lse: also return the float32 log-sum-exp (batch, heads_q, seqlen_q) (natural log);
            it is differentiable too.

    Returns:
        out shaped like q (and lse when return_lse).

    Example:
        >>> q = torch.randn(2, 1024, 32, 128, dtype=torch.bfloat16, device="cuda")
        >>> k = v = torch.randn(2, 1024, 8, 128, dtype=torch.bfloat16, device="cuda")
        >>> out = pyllmops.flash_attention(q, k, v, causal=True, window_size=(256, 0))
    """
    _check_qkv(q, k, v, varlen=False)
    left, right = _window(causal, window_size, q.shape[1], k.shape[1])
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    cap = _softcap(softcap)
    check_bool("deterministic", deterministic)
    check_bool("return_lse", return_lse)
    out, lse = _attn_fwd(q, k, v, None, None, q.shape[1], k.shape[1], scale, cap, left, right, False, deterministic)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           window_size=(-1, -1), softmax_scale=None, softcap=0.0, deterministic=False,
                           return_lse=False, validate=None):
    """flash_attention on packed sequences without padding; differentiable.

    Args:
        q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), cumulative lengths starting at 0: sequence b is
            rows cu_seqlens[b]:cu_seqlens[b + 1]. Lengths may differ between q and k (masks align per
            sequence, bottom-right) and may be 0.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (host ints; they size the kernel grid),
            each >= every length of its cu_seqlens. rows > batch * max_seqlen raises ValueError on any
            device (no synchronization needed). A value above the rows of its tensor (no sequence can be longer)
            is clamped to them, so 2**62 means "unknown" rather than a grid of 2**62 rows.
        causal, window_size, softmax_scale, softcap, deterministic, return_lse: as flash_attention.
        cu_seqlens_q / cu_seqlens_k may have any stride (a strided view is copied to contiguous).
        validate: check the offset values (cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = rows,
            lengths <= max_seqlen; ValueError naming the sequence) before the launch. Default: always on
            CPU tensors; on CUDA no, since reading device offsets synchronizes: the kernels then check
            each sequence, write NaN to every output (and gradient) row of a sequence that breaks the
            contract, and raise a bit that pyllmops.check_kernel_errors() reports (RuntimeError naming
            the argument, the first bad sequence and its values). True on CUDA checks eagerly (syncs).

    Returns:
        out (total_q, heads_q, head_dim) (and lse float32 (heads_q, total_q) when return_lse).

    Example:
        >>> cu = torch.tensor([0, 100, 1100], dtype=torch.int32)
        >>> q = torch.randn(1100, 8, 64); k = v = torch.randn(1100, 2, 64)
        >>> out = pyllmops.flash_attention_varlen(q, k, v, cu, cu, 1000, 1000, causal=True)
    """
    _check_qkv(q, k, v, varlen=True)
    if validate is None:
        validate = not on_cuda(q)
    check_bool("validate", validate)
    _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, validate)
    max_seqlen_q, max_seqlen_k = min(max_seqlen_q, q.shape[0]), min(max_seqlen_k, k.shape[0])
    left, right = _window(causal, window_size, max_seqlen_q, max_seqlen_k)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    cap = _softcap(softcap)
    check_bool("deterministic", deterministic)
    check_bool("return_lse", return_lse)
    out, lse = _attn_fwd(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
                         scale, cap, left, right, False, deterministic)
    return (out, lse) if return_lse else out


def _sdpa(query, key, value, *, is_causal, scale, window_size, softcap=0.0):
    """(batch, heads, seqlen, head_dim) attention with torch SDPA's top-left causal alignment; the
    arguments are already checked by pyllmops.nn.functional.scaled_dot_product_attention (window_size already
    clamped by _window)."""
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # views, no copies
    left, right = window_size
    if is_causal:
        right = 0
    out, _ = _attn_fwd(q, k, v, None, None, q.shape[1], k.shape[1], scale, softcap, left, right, True, False)
    return out.transpose(1, 2)
