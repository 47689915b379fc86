"""LoRA, QLoRA and QA-LoRA: fused base matmul + low-rank adapter, forward and backward; INT quantization.

Ops (torch.ops.pyllmops.*), in the order: schema + kernel, fake, autograd:
  lora_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_scale) -> (y, xa)
  qlora_fwd(x, packed, absmax, nested..., blocksize, nested_blocksize, out_features, bias, ...) -> (y, xa)
  qalora_fwd(x, qweight, scales, zeros, bits, group_size, bias, ...) -> (y, xa)
  *_bwd_dx(dy, <weight>, lora_a, lora_b, scaling, dropout_scale) -> (dx, g)       (used by autograd)
  int_quantize(w, bits, group_size) -> (qweight, scales, zeros); int_dequantize(...) -> w
Public API: lora_linear, qlora_linear, qalora_linear, int_linear, quantize_int, dequantize_int.

Every forward is one kernel (csrc/lora/lora.h):  y = x.W^T + bias + scaling * (xd.A^T).B^T with
xd = x * dropout_scale (the adapter's input only) and xa = xd.A^T (fp32) returned for the backward.
The input gradient is the same kernel with W transposed: dx = dy.W + scaling * ((dy.B).A) * mask,
which also returns g = dy.B; then dA = scaling * g^T.xd and dB = scaling * dy^T.xa are rank-r
products done with torch. QA-LoRA's adapter sees x mean-pooled over groups of group_size features.
"""
import math
import os
import struct
from typing import Optional

import torch

from pyllmops._ext import lib
from pyllmops.ops._common import (FLOAT_DTYPES, check_bias, check_int, check_linear_input, check_tensor, empty,
                                  on_cuda, opt_view, plain_eager, stream, view)
from pyllmops.ops.nf4 import _nf4_dequantize_impl, _nf4_linear_impl, check_linear_weight, fused_max_rows

INT_BITS = (2, 3, 4)
INT_GROUP_SIZES = (32, 64, 128)
# csrc/lora/lora.h: the fused CUDA kernels' rank limits (kMaxRankCuda: the SIMT kernel, fp32 inputs or
# PYLLMOPS_LORA_TENSOR_CORES=0; kMaxRankCudaMma: the tensor-core kernel, fp16 / bf16). Larger ranks take the
# workspace path.
MAX_RANK_CUDA = 64
MAX_RANK_CUDA_MMA = 256


def codes_per_word(bits):
    return 32 // bits


def words_per_row(in_features, bits):
    return -(-in_features // codes_per_word(bits))


# ================================ kernels ================================
def tensor_cores_enabled():
    """fp16 / bf16 CUDA calls of the fused kernel take the mma.sync main loop (csrc/lora/lora_cuda_mma.cu,
    sm_80+) by default, since it passes the emulated tests (docs/emulator.md, with negative controls);
    PYLLMOPS_LORA_TENSOR_CORES=0 selects the SIMT fp32 loop. Not yet run on a GPU."""
    return os.environ.get("PYLLMOPS_LORA_TENSOR_CORES", "1") != "0"


def _c(t):
    return None if t is None else t.contiguous()


# Rows of x (tokens) from which the base product runs as a library GEMM on a transient dequantized
# weight (the workspace path) instead of the fused kernel. CPU: always (measured, docs/lora.md: the
# fused CPU kernel lost to dequantize + MKL at every row count, 1 included, for all three bases; it
# stays reachable with PYLLMOPS_LORA_PATH=fused as the CUDA algorithm's CPU twin). CUDA: from 64 rows,
# the issue-12 design point (predicted; no GPU measurement yet).
CROSSOVER_CPU = 1
CROSSOVER_CUDA = 64
PATHS = ("auto", "fused", "workspace")


def fused_rank_limit(dtype):
    """The largest rank the fused CUDA kernel takes for x of `dtype`: 256 on the tensor-core kernel (fp16 /
    bf16; ranks above 64 get t from a down pass, csrc/lora/lora_cuda_mma.cu), 64 on the SIMT kernel (fp32,
    or PYLLMOPS_LORA_TENSOR_CORES=0: t lives in registers). dtype None: the SIMT limit."""
    mma = dtype in (torch.float16, torch.bfloat16) and tensor_cores_enabled()
    return MAX_RANK_CUDA_MMA if mma else MAX_RANK_CUDA


def kernel_path(kind, m, device, r=0, dtype=None):
    """'fused' or 'workspace' for an m-row, rank-r call with x of `dtype`; PYLLMOPS_LORA_PATH=fused|workspace
    forces one, except that ranks above fused_rank_limit(dtype) always take the workspace path on CUDA."""
    forced = os.environ.get("PYLLMOPS_LORA_PATH", "auto")
    if forced not in PATHS:
        raise ValueError(f"PYLLMOPS_LORA_PATH must be one of {PATHS}, got {forced!r}")
    cuda = on_cuda(device)
    if cuda and r > fused_rank_limit(dtype):
        return "workspace"
    if forced != "auto":
        return forced
    return "workspace" if m >= (CROSSOVER_CUDA if cuda else CROSSOVER_CPU) else "fused"


def _run(kind, inp_nd, w, transposed, bias, lora_a, lora_b, scaling, dropout_scale, n_cols, pool):
    """One forward (transposed=False: y, t = x.A^T) or input-gradient (transposed=True: dx, t = dy.B)
    of the op family on `inp_nd` (..., n_red) -> (out (..., n_cols), t [m, r] fp32). `w` holds the
    weight's arguments in the op's order (see _decode)."""
    inp = _flat(inp_nd)
    r = lora_a.shape[0]
    path = kernel_path(kind, inp.shape[0], inp.device, r, inp.dtype)
    if path == "fused" and _skinny_base(kind, inp, transposed):
        path = "workspace"
    if path == "fused" and r > MAX_RANK_CUDA and on_cuda(inp) and not _fits_32bit(inp.shape[1], n_cols, r):
        path = "workspace"  # beyond the tensor-core kernel's 32-bit indices (the SIMT kernel stops at rank 64)
    if path == "workspace":
        out, t = _workspace(kind, inp, w, transposed, bias, lora_a, lora_b, scaling, dropout_scale, pool)
    else:
        out, t = _fused(kind, inp, w, transposed, bias, lora_a, lora_b, scaling, dropout_scale, n_cols)
    return out.view(*inp_nd.shape[:-1], n_cols), t


def _fits_32bit(n_red, n_cols, r):
    """csrc/lora/lora_cuda_mma.cu fits_32bit_indices: W and the tiles' / adapter's extents below 2^31."""
    return n_red * n_cols < 2 ** 31 and max(r, 64) * max(n_red, n_cols) < 2 ** 31


def _skinny_base(kind, inp, transposed):
    """A CUDA QLoRA forward at decode shapes (fp16 / bf16, up to ops.nf4's tensor-core limit of 16 rows, the
    automatic path): the base product runs in ops.nf4's skinny tensor-core kernel (W read once, decoded in
    registers; predicted ~75-80% of H100 HBM, docs/nf4.md) and the rank-r terms as two small GEMMs, rather
    than in the fused LoRA kernel, whose decode loop is latency-bound at one row (predicted 2-3% of HBM,
    docs/lora.md). PYLLMOPS_LORA_PATH=fused keeps the fused kernel."""
    return (kind == "nf4" and not transposed and on_cuda(inp) and inp.dtype != torch.float32
            and 1 <= inp.shape[0] <= fused_max_rows(inp.dtype, True)
            and os.environ.get("PYLLMOPS_LORA_PATH", "auto") == "auto")


def down_splits(m, r, n_red):
    """Reduction slices of the tensor-core kernel's down pass (t = x.A^T, ranks above 64; lora_cuda_mma.cu):
    enough CTAs to keep ~128 SMs busy (rank chunks of 64 x row tiles x slices), at most one slice per
    32-wide step, at most 32, and at most 256 KB of partial sums for a fused CTA to add up (slices x
    min(m, 64) rows x r x 4 bytes), so that the fused kernel's epilogue stays small next to its W tile."""
    ctas = -(-r // 64) * max(1, -(-m // 64))
    steps = -(-n_red // 32)
    return max(1, min(32, steps, 128 // ctas, 65536 // (max(1, min(m, 64)) * r)))


# Split-K of the tensor-core decode kernel (docs/lora.md, "Split-K"): CTAs to aim for, about 4 resident CTAs per SM
# (its 39 KB of shared memory and 128 registers x 128 threads allow 4) on a 132-SM H100 / H200.
SPLIT_K_TARGET_CTAS = 512
SPLIT_K_MIN_STEPS = 4  # 32-wide steps per slice at least, so the copies in flight have steps to overlap


def split_k(m, n_cols, n_red, weight_bytes):
    """Reduction slices of the tensor-core fused kernel (lora_cuda_mma.cu, split-K): the (column tile, row tile)
    grid times the slices makes about SPLIT_K_TARGET_CTAS CTAs, each slice at least SPLIT_K_MIN_STEPS steps, and
    the fp32 partial sums (slices x min(m, 64) rows x n_cols x 4 bytes per row tile) at most the bytes of W that
    the same CTAs read (`weight_bytes` per weight: 2 dense bf16, ~0.56 NF4, bits / 8 + scales INT), so that they
    stay a fraction of the call's traffic (and, at decode sizes, in L2). 1: no split (the kernel as before)."""
    if m <= 0 or n_cols <= 0:
        return 1
    tiles = -(-n_cols // 64) * -(-m // 64)
    steps = -(-n_red // 32)
    by_ctas = SPLIT_K_TARGET_CTAS // tiles
    by_steps = steps // SPLIT_K_MIN_STEPS
    by_bytes = int(n_red * weight_bytes) // (4 * min(m, 64))
    return max(1, min(by_ctas, by_steps, by_bytes))


def _weight_bytes(kind, w, dtype):
    """Bytes per base weight as the fused kernel reads them: split_k's budget for the partial sums."""
    if kind == "dense":
        return torch.finfo(dtype).bits // 8
    if kind == "nf4":
        return 0.5 + 4 / w[5]  # codes + fp32 absmax per block (nested absmax is smaller still)
    return w[3] / 8 + 8 / w[4]  # codes + fp32 scale and zero per group


def _split_k_applies(inp, n_cols, r):
    """The split-K grid exists on the CUDA tensor-core kernel only (fp16 / bf16, 32-bit indices)."""
    return (on_cuda(inp) and inp.dtype in (torch.float16, torch.bfloat16) and tensor_cores_enabled()
            and _fits_32bit(inp.shape[1], n_cols, r))


def _flat(x):
    """(..., k) -> (rows, k) contiguous; explicit row count, so k = 0 works (reshape(-1, 0) cannot)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def _fused(kind, inp, w, transposed, bias, lora_a, lora_b, scaling, dropout_scale, n_cols):
    """The fused kernel (csrc/lora/lora.h): the weight decoded tile by tile, the adapter as an epilogue."""
    mask = None if dropout_scale is None else _flat(dropout_scale)
    m, r = inp.shape[0], lora_a.shape[0]
    out = empty((m, n_cols), inp.dtype, inp.device)
    t = empty((m, r), torch.float32, inp.device)
    # split-K (decode shapes on the tensor-core kernel): the slices' fp32 partial sums of the base product
    splits = split_k(m, n_cols, inp.shape[1], _weight_bytes(kind, w, inp.dtype)) if _split_k_applies(
        inp, n_cols, r) else 1
    o_part = empty((splits, m, n_cols), torch.float32, inp.device) if splits > 1 else None
    # ranks above 64 on the CUDA tensor-core kernel, and every rank with split-K: the down pass's partial sums of
    # t (every element written before it is read)
    t_part = empty((down_splits(m, r, inp.shape[1]), m, r), torch.float32, inp.device) if (
        on_cuda(inp) and (r > MAX_RANK_CUDA or (o_part is not None and r > 0))) else None
    in_scale, out_scale = (None, mask) if transposed else (mask, None)
    if kind == "dense":
        fn, wargs = lib().lora_fused_dense, (view(w[0].contiguous()),)
    elif kind == "nf4":
        packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize = w[:7]
        fn = lib().lora_fused_nf4
        wargs = (view(packed.contiguous()), view(absmax.contiguous()), opt_view(_c(nested_absmax)),
                 opt_view(_c(nested_code)), opt_view(_c(nested_offset)), blocksize, nested_blocksize)
    else:
        qweight, scales, zeros, bits, group_size = w
        fn = lib().lora_fused_int
        wargs = (view(qweight.contiguous()), view(scales.contiguous()), view(zeros.contiguous()), bits, group_size)
    fn(view(inp), opt_view(in_scale), opt_view(out_scale), *wargs, transposed, opt_view(_c(bias)),
       view(lora_a.contiguous()), view(lora_b.contiguous()), float(scaling), view(out), view(t), opt_view(t_part),
       opt_view(o_part), tensor_cores_enabled(), stream(inp))
    return out, t


def _decode(kind, w, dtype):
    """The dense (out_features, in_features) base weight in `dtype`: the weight itself, or a transient
    workspace filled by our dequantize kernel (NF4: ops.nf4; INT: int_dequantize). Never cached: the
    caller drops it when its GEMM is done, and the backward decodes again."""
    if kind == "dense":
        return w[0] if w[0].dtype == dtype else w[0].to(dtype)
    # The op bodies are called directly: this runs inside our own op (or its eager twin), and a second
    # trip through the dispatcher costs ~50 us, as much as a 1-row 1024 x 1024 GEMM.
    if kind == "nf4":
        packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, n, k = w
        return _nf4_dequantize_impl(packed, absmax, nested_absmax, nested_code, nested_offset, blocksize,
                                    nested_blocksize, n * k, dtype).view(n, k)
    qweight, scales, zeros, bits, group_size = w
    return _int_dequantize_impl(qweight, scales, zeros, bits, group_size, dtype)


def _workspace(kind, inp, w, transposed, bias, lora_a, lora_b, scaling, dropout_scale, pool):
    """Training / prefill shapes: the base product is one library GEMM (torch.mm: MKL / oneDNN on the
    CPU, cuBLAS on CUDA) on the decoded weight; the adapter terms are rank-r GEMMs accumulated into the
    base product in place (addmm_ with alpha = scaling), so the output is written by the GEMM and
    updated once, with no separate scale or add pass.
      forward:  y = x.W^T + bias;  t = pool(x * mask).A^T;  y += scaling * t.B^T
      backward: dx = dy.W;  t = dy.B;  dx += scaling * mask * expand(t.A)   (dW is never formed)
    t comes back in fp32 (the backward's dA / dB use it)."""
    m, r = inp.shape[0], lora_a.shape[0]
    scaling = _float32(scaling)  # the kernels' float32 value
    mask = None if dropout_scale is None else _flat(dropout_scale)
    if not transposed and kind == "nf4" and 1 <= m <= fused_max_rows(inp.dtype, on_cuda(inp)):
        # decode shapes: ops.nf4's skinny kernel reads the 4-bit codes once and writes no workspace, up to
        # ops.nf4's crossover (CPU, measured: 16 rows in fp32 / fp16, 8 in bf16; 4096x1024, m = 1: 2.9 ms
        # against 5.0 ms for dequantize + matmul, bitsandbytes 3.0 ms. CUDA, predicted: 16 rows fp16 / bf16,
        # 8 fp32; see _skinny_base). It falls back to dequantize + matmul where its kernel does not apply.
        out = _nf4_linear_impl(inp, *w[:5], bias, w[5], w[6], w[7])
    else:
        weight = _decode(kind, w, inp.dtype)
        if transposed:
            out = torch.mm(inp, weight)
        else:
            out = torch.mm(inp, weight.t()) if bias is None else torch.addmm(bias, inp, weight.t())
        del weight  # the workspace is released before the adapter's GEMMs
    if not transposed:
        xd = inp if mask is None else inp * mask
        xp = xd if pool == 1 else xd.view(m, -1, pool).mean(-1)
        t = torch.mm(xp, lora_a.t())
        if r:
            out.addmm_(t, lora_b.t(), alpha=scaling)
    else:
        t = torch.mm(inp, lora_b)
        if r:
            if pool == 1 and mask is None:
                out.addmm_(t, lora_a, alpha=scaling)
            else:
                term = torch.mm(t, lora_a)  # (m, in_features / pool): one value per pooled group
                if pool != 1:
                    term = term.mul_(1.0 / pool).unsqueeze(-1)
                view_ = out.view(m, -1, pool) if pool != 1 else out
                if mask is None:
                    view_.add_(term, alpha=scaling)
                else:
                    view_.addcmul_(term, mask.view(m, -1, pool) if pool != 1 else mask, value=scaling)
    return out, t.float()


# ---- dense LoRA ----------------------------------------------------------------------------------
@torch.library.custom_op("pyllmops::lora_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
              lora_b: torch.Tensor, scaling: float, dropout_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    return _run("dense", x, (weight,), False, bias, lora_a, lora_b, scaling, dropout_scale, weight.shape[0], 1)


@torch.library.custom_op("pyllmops::lora_bwd_dx", mutates_args=(), device_types=("cpu", "cuda"))
def _lora_bwd_dx(dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 dropout_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("dense", dy, (weight,), True, None, lora_a, lora_b, scaling, dropout_scale, weight.shape[1], 1)


# ---- QLoRA (NF4 base) ----------------------------------------------------------------------------
@torch.library.custom_op("pyllmops::qlora_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def _qlora_fwd(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], nested_offset: Optional[torch.Tensor], blocksize: int,
               nested_blocksize: int, out_features: int, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
               lora_b: torch.Tensor, scaling: float,
               dropout_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w = (packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, out_features,
         x.shape[-1])
    return _run("nf4", x, w, False, bias, lora_a, lora_b, scaling, dropout_scale, out_features, 1)


@torch.library.custom_op("pyllmops::qlora_bwd_dx", mutates_args=(), device_types=("cpu", "cuda"))
def _qlora_bwd_dx(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                  nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                  nested_offset: Optional[torch.Tensor], blocksize: int, nested_blocksize: int, in_features: int,
                  lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  dropout_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    w = (packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, dy.shape[-1],
         in_features)
    return _run("nf4", dy, w, True, None, lora_a, lora_b, scaling, dropout_scale, in_features, 1)


# ---- QA-LoRA (INT base, pooled adapter input) ----------------------------------------------------
@torch.library.custom_op("pyllmops::qalora_fwd", mutates_args=(), device_types=("cpu", "cuda"))
def _qalora_fwd(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int, bias: Optional[torch.Tensor], lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("int", x, (qweight, scales, zeros, bits, group_size), False, bias, lora_a, lora_b, scaling,
                dropout_scale, qweight.shape[0], group_size)


@torch.library.custom_op("pyllmops::qalora_bwd_dx", mutates_args=(), device_types=("cpu", "cuda"))
def _qalora_bwd_dx(dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                   dropout_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _run("int", dy, (qweight, scales, zeros, bits, group_size), True, None, lora_a, lora_b, scaling,
                dropout_scale, scales.shape[1] * group_size, group_size)


# ---- fakes -----------------------------------------------------------------------------------------
def _fake_out(x, n_cols, r):
    m = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], n_cols)), x.new_empty((m, r), dtype=torch.float32)


@_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_scale):
    return _fake_out(x, weight.shape[0], lora_a.shape[0])


@_lora_bwd_dx.register_fake
def _(dy, weight, lora_a, lora_b, scaling, dropout_scale):
    return _fake_out(dy, weight.shape[1], lora_a.shape[0])


@_qlora_fwd.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, out_features, bias,
      lora_a, lora_b, scaling, dropout_scale):
    return _fake_out(x, out_features, lora_a.shape[0])


@_qlora_bwd_dx.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, in_features,
      lora_a, lora_b, scaling, dropout_scale):
    return _fake_out(dy, in_features, lora_a.shape[0])


@_qalora_fwd.register_fake
def _(x, qweight, scales, zeros, bits, group_size, bias, lora_a, lora_b, scaling, dropout_scale):
    return _fake_out(x, qweight.shape[0], lora_a.shape[0])


@_qalora_bwd_dx.register_fake
def _(dy, qweight, scales, zeros, bits, group_size, lora_a, lora_b, scaling, dropout_scale):
    return _fake_out(dy, scales.shape[1] * group_size, lora_a.shape[0])


# ---- autograd: one backward for the three forwards ----------------------------------------------------
# Per op: where x, the weight tensors, bias, lora_a, lora_b, scaling, dropout_scale sit in the inputs.
_LAYOUT = {
    "lora": dict(weight=slice(1, 2), bias=2, a=3, b=4, s=5, mask=6),
    "qlora": dict(weight=slice(1, 9), bias=9, a=10, b=11, s=12, mask=13),
    "qalora": dict(weight=slice(1, 6), bias=6, a=7, b=8, s=9, mask=10),
}
_KIND = {"lora": "dense", "qlora": "nf4", "qalora": "int"}


def _pooled(x2, pool):
    return x2 if pool == 1 else x2.view(x2.shape[0], -1, pool).mean(-1)


def _grads(kind, w, x, lora_a, lora_b, mask, xa, s, pool, grad_y, grad_xa, need, dx_fn):
    """Gradients of y (and of the returned xa, rarely used) -> (dx, dW, d_bias, dA, dB), None where
    `need` (x, W, bias, A, B) is False. dx_fn(dy) -> (dx, g = dy.B fp32) is the op's input-gradient
    (the fused kernel or the workspace GEMM; dW is never formed unless W itself requires grad).
    dA = s * g^T.pool(x * mask) and dB = s * dy^T.xa are rank-r GEMMs in x's dtype."""
    dt, k = x.dtype, x.shape[-1]
    if grad_y is None:  # only xa was differentiated
        grad_y = x.new_zeros(*x.shape[:-1], lora_b.shape[0])
    dy = _flat(grad_y)
    dx = dw = dbias = da = db = None
    if need[0]:
        dx, g = dx_fn(dy)
        dx = _flat(dx)
    else:
        g = torch.mm(dy, lora_b)
    if need[3]:
        x2 = _flat(x)
        xp = _pooled(x2 if mask is None else x2 * _flat(mask), pool)
    if grad_xa is not None and need[0]:  # xa is an output too: xa = pool(x * mask) . A^T
        extra = grad_xa.to(dt) @ lora_a
        if pool != 1:
            extra = extra.repeat_interleave(pool, dim=1) / pool
        if mask is not None:
            extra = extra * _flat(mask)
        dx = dx + extra
    if need[0]:
        dx = dx.view(x.shape)
    if need[3]:
        da = torch.mm(g.to(dt).t(), xp).mul_(s)
        if grad_xa is not None:
            da = da + grad_xa.to(dt).t() @ xp
    if need[4]:
        db = torch.mm(dy.t(), xa.to(dt)).mul_(s)
    if need[2]:
        dbias = dy.sum(0)
    if need[1]:  # only a dense W: normally frozen; honour requires_grad anyway
        dw = torch.mm(dy.t(), _flat(x))
    return dx, dw, dbias, da, db


def _dx_op(kind, w, k, lora_a, lora_b, s, mask):
    """The input-gradient as a registered op (what torch.compile and opcheck see)."""
    if kind == "lora":
        return lambda dy: torch.ops.pyllmops.lora_bwd_dx(dy, w[0], lora_a, lora_b, s, mask)
    if kind == "qlora":
        return lambda dy: torch.ops.pyllmops.qlora_bwd_dx(dy, *w[:7], k, lora_a, lora_b, s, mask)
    return lambda dy: torch.ops.pyllmops.qalora_bwd_dx(dy, *w[:5], lora_a, lora_b, s, mask)


def _make_setup(kind):
    lay = _LAYOUT[kind]

    def setup(ctx, inputs, output):
        w = list(inputs[lay["weight"]])
        ctx.tensor_slots = [i for i, v in enumerate(w) if isinstance(v, torch.Tensor)]
        ctx.w_consts = [None if isinstance(v, torch.Tensor) else v for v in w]
        ctx.save_for_backward(inputs[0], inputs[lay["a"]], inputs[lay["b"]], inputs[lay["mask"]], output[1],
                              *[w[i] for i in ctx.tensor_slots])
        ctx.scaling = inputs[lay["s"]]
        ctx.pool = inputs[5] if kind == "qalora" else 1
        # xa is an output only so the backward can reuse it; callers almost never differentiate
        # through it. Unmaterialized, its unused gradient arrives as None instead of an (m, r) zero
        # tensor that would cost an (m, k) matmul.
        ctx.set_materialize_grads(False)

    return setup


def _make_backward(kind):
    lay = _LAYOUT[kind]
    n_inputs = lay["mask"] + 1

    def backward(ctx, grad_y, grad_xa):
        x, lora_a, lora_b, mask, xa, *saved = ctx.saved_tensors
        w = list(ctx.w_consts)
        for slot, t in zip(ctx.tensor_slots, saved):
            w[slot] = t
        nig = ctx.needs_input_grad
        need = (nig[0], kind == "lora" and nig[1], nig[lay["bias"]], nig[lay["a"]], nig[lay["b"]])
        dx_fn = _dx_op(kind, w, x.shape[-1], lora_a, lora_b, ctx.scaling, mask)
        dx, dw, dbias, da, db = _grads(kind, w, x, lora_a, lora_b, mask, xa, ctx.scaling, ctx.pool, grad_y, grad_xa,
                                       need, dx_fn)
        grads = [None] * n_inputs
        grads[0], grads[lay["bias"]], grads[lay["a"]], grads[lay["b"]] = dx, dbias, da, db
        if kind == "lora":
            grads[1] = dw
        return tuple(grads)

    return backward


for _kind, _op in (("lora", _lora_fwd), ("qlora", _qlora_fwd), ("qalora", _qalora_fwd)):
    _op.register_autograd(_make_backward(_kind), setup_context=_make_setup(_kind))


class _Eager(torch.autograd.Function):
    """The same forward and backward as the registered ops, called without the dispatcher (eager mode:
    the registered op's Python autograd wrapper and two dispatches cost more than a decode-shape GEMM).
    Under torch.compile or a TorchDispatchMode the public functions call the registered ops instead."""

    @staticmethod
    def forward(ctx, kind, x, w0, w_rest, bias, lora_a, lora_b, scaling, mask, n_cols, pool):
        w = (w0, *w_rest)
        y, xa = _run(kind, x, w, False, bias, lora_a, lora_b, scaling, mask, n_cols, pool)
        ctx.kind, ctx.w_rest, ctx.scaling, ctx.pool = kind, w_rest, scaling, pool
        ctx.save_for_backward(x, w0, lora_a, lora_b, mask, xa)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w0, lora_a, lora_b, mask, xa = ctx.saved_tensors
        w, kind, s, pool = (w0, *ctx.w_rest), ctx.kind, ctx.scaling, ctx.pool
        nig = ctx.needs_input_grad
        need = (nig[1], kind == "dense" and nig[2], nig[4], nig[5], nig[6])
        k = x.shape[-1]

        def dx_fn(dy):
            return _run(kind, dy, w, True, None, lora_a, lora_b, s, mask, k, pool)

        dx, dw, dbias, da, db = _grads(kind, w, x, lora_a, lora_b, mask, xa, s, pool, grad_y, None, need, dx_fn)
        return None, dx, dw, None, dbias, da, db, None, None, None, None


def _dense_autograd(x, weight, bias, lora_a, lora_b, scaling, mask):
    """Eager dense LoRA on the workspace path as plain differentiable torch ops, so that the backward runs
    on torch's C++ autograd nodes with no Python in it: y = x.W^T + bias (one GEMM), t = (x * mask).A^T,
    y += scaling * t.B^T in place (addmm_: no separate scale or add pass over y, which peft's layer pays in
    the forward and again in the backward). The same GEMMs as _workspace; measured 1024 x 1024, r = 8,
    1 row, fp32, one thread: forward+backward 0.87 -> 0.7x ms (the Python autograd.Function's backward
    cost ~100 us a call, as much as the 1-row GEMV)."""
    flat = x.dim() != 2  # a 2-D x needs no reshape (no view nodes for the backward to walk)
    x2 = _flat(x) if flat else x
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    xd = x2 if mask is None else x2 * mask.view(x2.shape)
    # scaling through addmm_'s alpha, applied to the product (t * scaling first would overflow for a
    # scaling near FLT_MAX and turn B = 0 into NaN)
    y.addmm_(torch.mm(xd, lora_a.t()), lora_b.t(), alpha=_float32(scaling))
    return y.view(*x.shape[:-1], weight.shape[0]) if flat else y


def _float32(v):
    """v rounded to float32, as the kernels see it (addmm_ would otherwise use the double)."""
    return struct.unpack("f", struct.pack("f", v))[0]


# ---- INT quantization ------------------------------------------------------------------------------
@torch.library.custom_op("pyllmops::int_quantize", mutates_args=(), device_types=("cpu", "cuda"))
def _int_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    qweight = empty((n, words_per_row(k, bits)), torch.int32, w.device)
    scales = empty((n, k // group_size), torch.float32, w.device)
    zeros = empty((n, k // group_size), torch.float32, w.device)
    lib().int_quantize(view(w.contiguous()), bits, group_size, view(qweight), view(scales), view(zeros), stream(w))
    return qweight, scales, zeros


@_int_quantize.register_fake
def _(w, bits, group_size):
    n, k = w.shape
    return (w.new_empty((n, words_per_row(k, bits)), dtype=torch.int32),
            w.new_empty((n, k // group_size), dtype=torch.float32),
            w.new_empty((n, k // group_size), dtype=torch.float32))


def _int_dequantize_impl(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                         group_size: int, dtype: torch.dtype) -> torch.Tensor:
    out = empty((qweight.shape[0], scales.shape[1] * group_size), dtype, qweight.device)
    lib().int_dequantize(view(qweight.contiguous()), view(scales.contiguous()), view(zeros.contiguous()), bits,
                         group_size, view(out), stream(qweight))
    return out


_int_dequantize = torch.library.custom_op("pyllmops::int_dequantize", mutates_args=(),
                                          device_types=("cpu", "cuda"))(_int_dequantize_impl)


@_int_dequantize.register_fake
def _(qweight, scales, zeros, bits, group_size, dtype):
    return qweight.new_empty((qweight.shape[0], scales.shape[1] * group_size), dtype=dtype)


# ================================ public API ================================
# The smallest magnitude that rounds to inf in float32: (2 - 2^-24) * 2^127, halfway between FLT_MAX and
# 2^128 (round-to-nearest-even sends the tie up). Below it a double casts to a finite float32.
FLOAT32_OVERFLOW = (2 - 2 ** -24) * 2 ** 127


def _check_scaling(scaling, name="scaling", why=""):
    """A real number that stays finite after the kernels' cast to float32 (issue 15: 1e39 passed a
    Python isfinite check, became inf in C++, and inf * 0 made the whole output NaN)."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{name} must be a finite float, got {type(scaling).__name__} {scaling!r}")
    try:
        finite = math.isfinite(scaling) and abs(float(scaling)) < FLOAT32_OVERFLOW
    except OverflowError:  # an int too large for a double
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite float whose float32 cast is finite (|{name}| <= "
                         f"3.4028235e38){why}, got {scaling!r}")


def _check_adapter(x, lora_a, lora_b, a_cols, out_features, scaling, bias, dropout):
    """Checks x's partners: lora_a (r, a_cols), lora_b (out_features, r), bias, scaling, dropout."""
    check_tensor("lora_a", lora_a, dtypes=(x.dtype,), dim=2, device=x.device)
    check_tensor("lora_b", lora_b, dtypes=(x.dtype,), dim=2, device=x.device)
    r = lora_a.shape[0]
    if lora_a.shape[1] != a_cols:
        raise ValueError(f"lora_a has shape {tuple(lora_a.shape)}, expected (r, {a_cols})")
    if tuple(lora_b.shape) != (out_features, r):
        raise ValueError(f"lora_b has shape {tuple(lora_b.shape)}, expected (out_features={out_features}, r={r}) "
                         f"(rank of lora_a is {r})")
    _check_scaling(scaling)
    check_bias(bias, x, out_features)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def dropout_mask(x, p, training=True):
    """The adapter-input dropout as a multiplier of x's shape and dtype (0 or 1/(1-p)); None if off."""
    if p == 0.0 or not training:
        return None
    keep = torch.rand(x.shape, device=x.device) >= p
    return keep.to(x.dtype) * (1.0 / (1.0 - p))


def lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, *, dropout=0.0, training=True):
    """y = x.W^T + bias + scaling * (dropout(x).A^T).B^T in one fused kernel (peft's LoRA layer).

    Differentiable in x, lora_a, lora_b and bias (and weight if it requires grad; it is normally
    frozen). The adapter's input x.A^T is kept (fp32, tokens x r) for the backward.

    Args:
        x: float32/float16/bfloat16 (..., in_features), any leading dims.
        weight: (out_features, in_features), x's dtype. bias: optional (out_features,), x's dtype.
        lora_a: (r, in_features); lora_b: (out_features, r); both x's dtype (peft's shapes).
        scaling: float, alpha / r (or alpha / sqrt(r) with rsLoRA).
        dropout: probability of dropping an element of the adapter's input (the base path never sees
            dropout, as in peft); applied only when training is True.

    Example:
        >>> x = torch.randn(2, 7, 64); w = torch.randn(32, 64)
        >>> a = torch.randn(8, 64, requires_grad=True); b = torch.zeros(32, 8, requires_grad=True)
        >>> y = pyllmops.lora_linear(x, w, a, b, scaling=2.0)   # (2, 7, 32)
    """
    check_tensor("weight", weight, dim=2)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_dim=1, device=weight.device)
    check_tensor("weight", weight, dtypes=(x.dtype,), dim=2, device=x.device)
    out_features, in_features = weight.shape
    check_linear_input(x, in_features)
    _check_adapter(x, lora_a, lora_b, in_features, out_features, scaling, bias, dropout)
    mask = dropout_mask(x, dropout, training)
    if plain_eager(x):
        if kernel_path("dense", math.prod(x.shape[:-1]), x.device, lora_a.shape[0], x.dtype) == "workspace":
            return _dense_autograd(x, weight, bias, lora_a, lora_b, float(scaling), mask)
        return _Eager.apply("dense", x, weight, (), bias, lora_a, lora_b, float(scaling), mask, out_features, 1)
    return torch.ops.pyllmops.lora_fwd(x, weight, bias, lora_a, lora_b, float(scaling), mask)[0]


def qlora_linear(x, packed, state, lora_a, lora_b, scaling, bias=None, *, dropout=0.0, training=True):
    """QLoRA: lora_linear with W stored in NF4 (quantize_nf4 / NF4Linear, bitsandbytes' format).

    W is decoded tile by tile inside the kernel, in the forward and in the backward (dx = dy.W + ...);
    no full-precision copy of W is ever made. Same arguments as lora_linear, with (packed, state)
    in place of weight.

    Example:
        >>> packed, state = pyllmops.quantize_nf4(torch.randn(32, 64), blocksize=64)
        >>> y = pyllmops.qlora_linear(torch.randn(5, 64), packed, state, a, b, scaling=2.0)
    """
    out_features, in_features = check_linear_weight(packed, state)
    check_linear_input(x, in_features, device=state.device)
    _check_adapter(x, lora_a, lora_b, in_features, out_features, scaling, bias, dropout)
    mask = dropout_mask(x, dropout, training)
    nested = state.kernel_args()[1:4]
    if plain_eager(x):
        w_rest = (state.absmax, *nested, state.blocksize, state.nested_blocksize, out_features, in_features)
        return _Eager.apply("nf4", x, packed, w_rest, bias, lora_a, lora_b, float(scaling), mask, out_features, 1)
    return torch.ops.pyllmops.qlora_fwd(x, packed, state.absmax, *nested, state.blocksize, state.nested_blocksize,
                                        out_features, bias, lora_a, lora_b, float(scaling), mask)[0]


def _check_int(qweight, scales, zeros, bits, group_size):
    check_int("bits", bits, choices=INT_BITS)
    check_int("group_size", group_size, choices=INT_GROUP_SIZES)
    check_tensor("scales", scales, dtypes=(torch.float32,), dim=2)
    check_tensor("qweight", qweight, dtypes=(torch.int32,), dim=2, device=scales.device)
    check_tensor("zeros", zeros, dtypes=(torch.float32,), dim=2, device=scales.device)
    n, in_features = scales.shape[0], scales.shape[1] * group_size
    if tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"zeros has shape {tuple(zeros.shape)}, expected scales' shape {tuple(scales.shape)}")
    want = (n, words_per_row(in_features, bits))
    if tuple(qweight.shape) != want:
        raise ValueError(f"qweight has shape {tuple(qweight.shape)}, expected {want} for {bits}-bit codes of "
                         f"{n} x {in_features} weights (scales {tuple(scales.shape)}, group_size {group_size})")
    return n, in_features


def check_finite_weight(w, name="w"):
    """Quantizers refuse NaN and +-inf weights (a min-max group would turn them into finite codes)."""
    if w.device.type == "meta":
        return
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), w.shape))
        raise ValueError(f"{name} must be finite to be quantized, got {w[index].item()} at index "
                         f"({', '.join(map(str, index))}) (the first of {int(bad.sum())} non-finite elements)")


def quantize_int(w, bits, group_size):
    """Group-wise asymmetric min-max quantization (QA-LoRA's base weight), along in_features.

    Per row and group of group_size consecutive input features: zero = min, scale = (max - min) /
    (2**bits - 1) (1 when that is 0), q = clamp(round_half_even((w - zero) / scale), 0, 2**bits - 1),
    all in float32; dequantized w' = q * scale + zero. Codes are packed 32 // bits per int32 word
    (element k of a row in word k // cpw at bit (k % cpw) * bits; 3-bit leaves 2 bits per word unused).

    Args:
        w: float32/float16/bfloat16 (out_features, in_features); in_features % group_size == 0; finite
            (NaN or +-inf raises ValueError naming the first bad index).
        bits: 2, 3 or 4. group_size: 32, 64 or 128.

    Returns:
        (qweight int32 (out, ceil(in / (32 // bits))), scales fp32 (out, in / group_size), zeros fp32 (same)).

    Example:
        >>> qweight, scales, zeros = pyllmops.quantize_int(torch.randn(256, 512), bits=4, group_size=64)
        >>> w_hat = pyllmops.dequantize_int(qweight, scales, zeros, bits=4, group_size=64)
    """
    check_tensor("w", w, dtypes=FLOAT_DTYPES, dim=2, nonempty=True)
    check_int("bits", bits, choices=INT_BITS)
    check_int("group_size", group_size, choices=INT_GROUP_SIZES)
    if w.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {w.shape[1]} (w shape "
                         f"{tuple(w.shape)})")
    check_finite_weight(w)
    return torch.ops.pyllmops.int_quantize(w, bits, group_size)


def dequantize_int(qweight, scales, zeros, bits, group_size, dtype=torch.float32):
    """Decodes quantize_int's output to a dense (out, in) tensor: q * scale + zero in fp32, rounded
    once to dtype."""
    _check_int(qweight, scales, zeros, bits, group_size)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return torch.ops.pyllmops.int_dequantize(qweight, scales, zeros, bits, group_size, dtype)


def qalora_linear(x, qweight, scales, zeros, lora_a, lora_b, scaling, *, bits, group_size, bias=None, dropout=0.0,
                  training=True):
    """QA-LoRA: y = x.W^T + bias + scaling * (pool(dropout(x)).A^T).B^T with W in group-wise INT.

    pool(x)[..., g] = mean(x[..., g*group_size:(g+1)*group_size]) (mean pooling over each
    quantization group), so lora_a has shape (r, in_features / group_size) and the adapter adds a
    constant per (output, group) to W: it folds into the zero points exactly (QALoRALinear.merge).

    Args:
        x: float32/float16/bfloat16 (..., in_features).
        qweight, scales, zeros: from quantize_int(w, bits, group_size).
        lora_a: (r, in_features / group_size); lora_b: (out_features, r); x's dtype.
    """
    n, in_features = _check_int(qweight, scales, zeros, bits, group_size)
    check_linear_input(x, in_features, device=scales.device)
    _check_adapter(x, lora_a, lora_b, in_features // group_size, n, scaling, bias, dropout)
    mask = dropout_mask(x, dropout, training)
    if plain_eager(x):
        return _Eager.apply("int", x, qweight, (scales, zeros, bits, group_size), bias, lora_a, lora_b, float(scaling),
                            mask, n, group_size)
    return torch.ops.pyllmops.qalora_fwd(x, qweight, scales, zeros, bits, group_size, bias, lora_a, lora_b,
                                         float(scaling), mask)[0]


def int_linear(x, qweight, scales, zeros, *, bits, group_size, bias=None):
    """y = x.W^T + bias with W in quantize_int's format, decoded tile by tile in the kernel (a merged
    QA-LoRA layer). Differentiable in x and bias."""
    n, in_features = _check_int(qweight, scales, zeros, bits, group_size)
    check_linear_input(x, in_features, device=scales.device)
    no_a = x.new_zeros((0, in_features // group_size))
    no_b = x.new_zeros((n, 0))
    _check_adapter(x, no_a, no_b, in_features // group_size, n, 1.0, bias, 0.0)
    if plain_eager(x):
        return _Eager.apply("int", x, qweight, (scales, zeros, bits, group_size), bias, no_a, no_b, 1.0, None, n,
                            group_size)
    return torch.ops.pyllmops.qalora_fwd(x, qweight, scales, zeros, bits, group_size, bias, no_a, no_b, 1.0, None)[0]
