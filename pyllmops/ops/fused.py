"""The fused CPU kernels of the decoder's training ops (csrc/fused): SwiGLU, RMSNorm and rotary, float32, forward
and backward, one pass each. pyllmops.nn.fused wires them into its autograd Functions where `applies` holds and runs
its torch composition elsewhere (other dtypes, CUDA tensors, traced calls), so these take no fake kernels.
Operands are made contiguous here; outputs are fresh contiguous float32 tensors (ops._common.empty)."""
import torch

from pyllmops._ext import lib
from pyllmops.ops._common import empty, on_cuda, plain_eager, view


def applies(*ts):
    """Whether the kernels take these operands: float32 CPU tensors (not an emulated-CUDA build's) in plain eager
    mode (the kernels take data pointers: no tracing, no fake tensors)."""
    t = ts[0]
    return (t.device.type == "cpu" and not on_cuda(t) and plain_eager(t)
            and all(x.dtype == torch.float32 for x in ts))


def _dense(t):
    return t if t.is_contiguous() else t.contiguous()


def _opt(t):
    return None if t is None else view(t)


def swiglu_forward(gate, up):
    """silu(gate) * up; returns (out, gate, up) with the operands as the kernel read them (contiguous)."""
    gate, up = _dense(gate), _dense(up)
    out = empty(gate.shape, torch.float32, gate.device)
    lib().fused_swiglu_forward(view(gate), view(up), view(out))
    return out, gate, up


def swiglu_backward(gate, up, dout, need_gate, need_up):
    """(dgate or None, dup or None) of silu(gate) * up."""
    dout = _dense(dout)
    dgate, dup = (empty(gate.shape, torch.float32, gate.device) if need else None for need in (need_gate, need_up))
    lib().fused_swiglu_backward(view(gate), view(up), view(dout), _opt(dgate), _opt(dup))
    return dgate, dup


def rms_norm_forward(x, weight, eps):
    """(y, rstd (..., 1), x, weight) with the operands as the kernel read them; x.shape[-1] >= 1."""
    x, weight = _dense(x), _dense(weight)
    y = empty(x.shape, torch.float32, x.device)
    rstd = empty(x.shape[:-1] + (1,), torch.float32, x.device)
    lib().fused_rms_norm_forward(view(x), view(weight), eps, view(y), view(rstd))
    return y, rstd, x, weight


def rms_norm_backward(dy, x, weight, rstd, need_x, need_weight):
    """(dx or None, dweight or None). dweight is summed per 64-row chunk by the kernel and the chunks are added in
    order here: the same bits at any thread count."""
    dy = _dense(dy)
    dx = empty(x.shape, torch.float32, x.device) if need_x else None
    part = None
    if need_weight:
        chunks = -(-x.numel() // x.shape[-1] // lib().FUSED_NORM_CHUNK_ROWS)
        part = empty((chunks, x.shape[-1]), torch.float32, x.device)
    lib().fused_rms_norm_backward(view(dy), view(x), view(weight), view(rstd), _opt(dx), _opt(part))
    return dx, None if part is None else part.sum(0)


def rotary(x, cos, sin, sign):
    """Rotate-half RoPE of x (tokens, heads, d) with half-width tables (tokens, 1, d / 2); sign -1 is the inverse
    rotation (the backward)."""
    x, cos, sin = _dense(x), _dense(cos), _dense(sin)
    out = empty(x.shape, torch.float32, x.device)
    lib().fused_rotary(view(x), view(cos), view(sin), sign, view(out))
    return out
