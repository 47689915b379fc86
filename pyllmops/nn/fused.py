"""Fused training modules of the decoder: each op is one autograd node whose backward saves only what
it needs, instead of the chain of small torch ops (and their saved intermediates) autograd records for
the plain formula.

  rms_norm(x, weight, eps)           y = x * rsqrt(mean(x^2) + eps) * weight; saves x and the per-row rstd
  swiglu(gate, up)                   silu(gate) * up; saves gate and up (silu recomputed in the backward)
  rotary(x, cos, sin)                the rotate-half rotary embedding on (tokens, heads, head_dim), with
                                     half-width cos/sin tables (tokens, head_dim / 2); the backward is the
                                     inverse rotation (nothing saved but the tables)
  linear_cross_entropy(h, weight,    mean over counted tokens of cross_entropy(h @ weight^T, targets):
      targets, ignore_index=-100)    the (tokens, vocab) logits never exist at once. Rows run in chunks;
                                     each chunk's logits give its loss and, when a gradient is needed,
                                     its softmax gradient and dh (and dweight) right away, so the backward
                                     only scales the stored gradients (Liger-Kernel's scheme: no logits
                                     recompute, no full-logits buffer).

Math in float32 (float64 stays float64); outputs in the input's dtype, logits' loss in float32.
rms_norm, swiglu and rotary run pyllmops' fused kernels (pyllmops.ops.fused, csrc/fused: one pass per direction
instead of torch's 4-7 element-wise passes) on float32 CPU tensors and float32 / float16 / bfloat16 CUDA tensors;
other dtypes (float64, half precision on the CPU) and traced / dispatch-mode calls run the torch composition below.
References in float64 and the tests: tests/test_fused.py.
"""
import torch

from pyllmops.ops import fused as kernels
from pyllmops.ops._common import check_tensor, empty

IGNORE = -100
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _wide(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_float(name, t, **kw):
    check_tensor(name, t, dtypes=_FLOATS, **kw)


# ---- RMSNorm -------------------------------------------------------------------------------------------

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        if kernels.applies(x, weight) and out_dtype == x.dtype and x.shape[-1] > 0:
            y, rstd, x, weight = kernels.rms_norm_forward(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            ctx.in_dtype = x.dtype
            return y
        xf = _wide(x)
        # sum of squares without an x^2 temporary: ||x||^2 / dim
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = xf * rstd
        y.mul_(weight.to(y.dtype))
        ctx.save_for_backward(x, weight, rstd)
        ctx.in_dtype = x.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if kernels.applies(dy, x, weight, tables=(rstd,)) and x.shape[-1] > 0:
            dx, dw = kernels.rms_norm_backward(dy, x, weight, rstd, *ctx.needs_input_grad[:2])
            return dx, dw, None, None
        xhat = _wide(x) * rstd
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (_wide(dy) * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # d/dx of xhat = x * rstd:  rstd * (g - xhat * mean(g * xhat)),  g = dy * weight
            g = _wide(dy) * weight.to(xhat.dtype)
            dot = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(x.shape[-1])
            dx = g.sub_(xhat.mul_(dot)).mul_(rstd).to(ctx.in_dtype)
        return dx, dw, None, None


def rms_norm(x, weight, eps=1e-5, out_dtype=None):
    """x (..., dim), weight (dim,) -> x / sqrt(mean(x^2, -1) + eps) * weight in out_dtype (default x's dtype),
    computed in float32 (float64 for float64 x)."""
    _check_float("x", x, min_dim=1)
    _check_float("weight", weight, dim=1, device=x.device)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} elements, expected x's last dim {x.shape[-1]}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return _RMSNorm.apply(x, weight, float(eps), x.dtype if out_dtype is None else out_dtype)


# ---- SwiGLU --------------------------------------------------------------------------------------------

class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if kernels.applies(gate, up):
            h, gate, up = kernels.swiglu_forward(gate, up)
            ctx.save_for_backward(gate, up)
            return h
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        if kernels.applies(dh, gate, up):
            return kernels.swiglu_backward(gate, up, dh, *ctx.needs_input_grad)
        dgate = dup = None
        if ctx.needs_input_grad[1]:
            dup = torch.nn.functional.silu(gate).mul_(dh)
        if ctx.needs_input_grad[0]:
            dgate = torch.ops.aten.silu_backward(dh * up, gate)
        return dgate, dup


def swiglu(gate, up):
    """silu(gate) * up (same shapes and dtype); the backward recomputes silu instead of keeping it."""
    _check_float("gate", gate)
    _check_float("up", up, device=gate.device)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have the same shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    return _SwiGLU.apply(gate, up)


# ---- rotary --------------------------------------------------------------------------------------------

def _rotate(x, cos, sin, sign):
    """out[:h] = x1 cos - sign x2 sin, out[h:] = x2 cos + sign x1 sin (sign -1: the inverse rotation)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = empty(x.shape, torch.promote_types(x.dtype, cos.dtype), x.device)  # every element written below
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
    return out


def _rotate_any(x, cos, sin, sign):
    """_rotate through the fused kernel where it applies (one pass), else the torch composition."""
    if kernels.applies(x, tables=(cos, sin)):
        return kernels.rotary(x, cos, sin, sign)
    return _rotate(x, cos, sin, sign).to(x.dtype)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_any(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate_any(dy, cos, sin, -1.0), None, None


def rotary_tables(positions, head_dim, base=10000.0):
    """Half-width cos / sin tables for `rotary`: positions int (tokens,) -> two float32 (tokens, 1, head_dim / 2)
    with angle[t, i] = positions[t] * base ** (-2 i / head_dim) (the same angles as nn.rotary.RotaryEmbedding)."""
    check_tensor("positions", positions, dtypes=(torch.int32, torch.int64), dim=1)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 2, got {head_dim!r}")
    inv_freq = 1.0 / (float(base) ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                                      / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def rotary(x, cos, sin):
    """Rotate-half rotary embedding of x (tokens, heads, head_dim) with tables from rotary_tables (tokens, 1,
    head_dim / 2): equal to nn.rotary.apply_rotary with the full-width tables, computed in float32 (float64
    stays float64), returned in x's dtype."""
    _check_float("x", x, dim=3)
    for name, t in (("cos", cos), ("sin", sin)):
        _check_float(name, t, dim=3, device=x.device)
        if t.shape != (x.shape[0], 1, x.shape[2] // 2) or x.shape[2] % 2:
            raise ValueError(f"{name} must have shape (tokens={x.shape[0]}, 1, head_dim / 2 = {x.shape[2] // 2}) "
                             f"for an even head_dim, got {tuple(t.shape)} (x: {tuple(x.shape)})")
    return _Rotary.apply(x, cos, sin)


# ---- linear + cross-entropy ----------------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 20  # logits per chunk (4 MiB in float32): cache-sized, and the GEMMs stay large


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_rows):
        n_tok, vocab = h.shape[0], weight.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)
        counted = targets != ignore_index
        n = counted.sum().clamp(min=1)
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = empty(h.shape, h.dtype, h.device) if need_dh else None  # every row written below
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_dw else None
        for i in range(0, n_tok, chunk_rows):
            hc, tc, mc = h[i:i + chunk_rows], targets[i:i + chunk_rows], counted[i:i + chunk_rows]
            logits = (hc @ weight.t()).to(acc)
            safe_t = torch.where(mc, tc, 0).unsqueeze(-1)
            picked = logits.gather(-1, safe_t).squeeze(-1)
            # log-sum-exp and softmax in place of the logits (no (rows, vocab) temporaries)
            row_max = logits.amax(-1, keepdim=True)
            e = logits.sub_(row_max).exp_()
            sum_e = e.sum(-1, keepdim=True)
            lse = sum_e.log().add_(row_max).squeeze(-1)
            total += torch.where(mc, lse - picked, 0).sum()
            if need_dh or need_dw:
                grad = e.div_(sum_e)  # softmax
                grad.scatter_add_(-1, safe_t, torch.full_like(picked, -1.0).unsqueeze(-1))
                row_scale = mc.unsqueeze(-1).to(acc) / n  # ignored rows: 0; counted rows: 1 / n
                scale_dh = not need_dw and h.dtype == acc  # then scale the (rows, hidden) dh, not the softmax
                if not scale_dh:
                    grad.mul_(row_scale)
                grad = grad.to(h.dtype)
                if need_dh:
                    dhc = torch.mm(grad, weight, out=dh[i:i + chunk_rows])
                    if scale_dh:
                        dhc.mul_(row_scale)
                if need_dw:
                    dw.addmm_(grad.t().to(acc), hc.to(acc))
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * dloss.to(dh.dtype), None if dw is None else dw * dloss.to(dw.dtype),
                None, None, None)


def linear_cross_entropy(h, weight, targets, ignore_index=IGNORE, chunk_rows=None):
    """Mean over the tokens whose target is not ignore_index of cross_entropy(h @ weight^T, targets), without
    materializing the (tokens, vocab) logits: equal to
        F.cross_entropy((h @ weight.T).float(), targets, ignore_index=ignore_index, reduction="sum") / max(n, 1)
    (n = counted tokens; 0 with zero gradients when none counts). h (tokens, hidden), weight (vocab, hidden)
    of h's dtype, targets int64 (tokens,) in [0, vocab) or ignore_index. chunk_rows: rows per chunk (default:
    about 1 M logits per chunk). Gradients for h and weight are computed in the forward pass (when they
    require grad) and scaled by the incoming gradient in the backward."""
    _check_float("h", h, dim=2)
    _check_float("weight", weight, dim=2, device=h.device)
    check_tensor("targets", targets, dtypes=(torch.int64,), dim=1, device=h.device)
    if weight.shape[1] != h.shape[1] or weight.dtype != h.dtype:
        raise ValueError(f"weight must be (vocab, hidden={h.shape[1]}) of h's dtype {h.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if targets.shape[0] != h.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} entries, expected one per row of h ({h.shape[0]})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    vocab = weight.shape[0]
    if targets.numel() and targets.device.type != "meta":
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {vocab}) and is not "
                             f"ignore_index ({ignore_index})")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_rows)
