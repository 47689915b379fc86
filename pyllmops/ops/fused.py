"""The fused kernels of the decoder's training ops (csrc/fused): SwiGLU, RMSNorm and rotary, forward and backward,
one pass each: float32 on the CPU, float32 / float16 / bfloat16 on CUDA (float32 arithmetic). pyllmops.nn.fused
wires them into its autograd Functions where `applies` holds and runs its torch composition elsewhere (other
dtypes, traced calls), so these take no fake kernels. Operands are made contiguous here; outputs are fresh
contiguous tensors of the operands' dtype (ops._common.empty)."""
import torch

from pyllmops._ext import lib
from pyllmops.ops._common import empty, on_cuda, opt_view, plain_eager, stream, view

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def applies(*ts, tables=()):
    """Whether the kernels take these operands in plain eager mode (they take data pointers: no tracing, no fake
    tensors): data operands ts of one dtype on one device, float32 on the CPU, float32 / float16 / bfloat16 on CUDA
    (CPU tensors of an emulated build included); `tables` (rstd, rotary cos / sin) float32 on that device."""
    t = ts[0]
    if not plain_eager(t):
        return False
    ok = t.dtype in _CUDA_DTYPES if on_cuda(t) else (t.device.type == "cpu" and t.dtype == torch.float32)
    return (ok and all(x.dtype == t.dtype and x.device == t.device for x in ts)
            and all(x.dtype == torch.float32 and x.device == t.device for x in tables))


def swiglu_forward(gate, up):
    """silu(gate) * up; returns (out, gate, up) with the operands as the kernel read them (contiguous)."""
    gate, up = gate.contiguous(), up.contiguous()
    out = empty(gate.shape, gate.dtype, gate.device)
    lib().fused_swiglu_forward(view(gate), view(up), view(out), stream(gate))
    return out, gate, up


def swiglu_backward(gate, up, dout, need_gate, need_up):
    """(dgate or None, dup or None) of silu(gate) * up."""
    dout = dout.contiguous()
    dgate, dup = (empty(gate.shape, gate.dtype, gate.device) if need else None for need in (need_gate, need_up))
    lib().fused_swiglu_backward(view(gate), view(up), view(dout), opt_view(dgate), opt_view(dup), stream(gate))
    return dgate, dup


def rms_norm_forward(x, weight, eps):
    """(y, rstd (..., 1), x, weight) with the operands as the kernel read them; x.shape[-1] >= 1."""
    x, weight = x.contiguous(), weight.contiguous()
    y = empty(x.shape, x.dtype, x.device)
    rstd = empty(x.shape[:-1] + (1,), torch.float32, x.device)
    lib().fused_rms_norm_forward(view(x), view(weight), eps, view(y), view(rstd), stream(x))
    return y, rstd, x, weight


def rms_norm_backward(dy, x, weight, rstd, need_x, need_weight):
    """(dx or None, dweight or None). dweight is summed per 64-row chunk by the kernel and the chunks are added in
    order here: the same bits at any thread count."""
    dy = dy.contiguous()
    dx = empty(x.shape, x.dtype, x.device) if need_x else None
    part = None
    if need_weight:
        chunks = -(-x.numel() // x.shape[-1] // lib().FUSED_NORM_CHUNK_ROWS)
        part = empty((chunks, x.shape[-1]), torch.float32, x.device)
    lib().fused_rms_norm_backward(view(dy), view(x), view(weight), view(rstd), opt_view(dx), opt_view(part), stream(x))
    return dx, None if part is None else part.sum(0).to(weight.dtype)


def rotary(x, cos, sin, sign):
    """Rotate-half RoPE of x (tokens, heads, d) with half-width tables (tokens, 1, d / 2); sign -1 is the inverse
    rotation (the backward)."""
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = empty(x.shape, x.dtype, x.device)
    lib().fused_rotary(view(x), view(cos), view(sin), sign, view(out), stream(x))
    return out
