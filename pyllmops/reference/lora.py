"""Reference LoRA / QLoRA / QA-LoRA: the plain formulas in PyTorch, float64-capable (the test oracle).

The forward formulas are written with autograd-friendly torch ops, so the reference gradients are
torch's own backward of the formula in float64.
"""
import torch

from pyllmops.reference.nf4 import dequantize_nf4


def lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, dropout_scale=None, compute=torch.float64):
    """x.W^T + bias + scaling * ((x * dropout_scale).A^T).B^T in `compute`."""
    xc = x.to(compute)
    xd = xc if dropout_scale is None else xc * dropout_scale.to(compute)
    y = xc @ weight.to(compute).T + scaling * (xd @ lora_a.to(compute).T) @ lora_b.to(compute).T
    return y if bias is None else y + bias.to(compute)


def qlora_linear(x, packed, state, lora_a, lora_b, scaling, bias=None, dropout_scale=None, compute=torch.float64):
    return lora_linear(x, dequantize_nf4(packed, state, compute), lora_a, lora_b, scaling, bias, dropout_scale,
                       compute)


def pool(x, group_size):
    """QA-LoRA's adapter input: the mean of each group of group_size consecutive features."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size).mean(-1)


def quantize_int(w, bits, group_size):
    """Group-wise asymmetric min-max quantization in exact fp32 arithmetic -> (codes int64 (n, k),
    scales fp32 (n, k / g), zeros fp32 (n, k / g)). Codes are unpacked; see pack_int."""
    n, k = w.shape
    g = w.to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    maxq = float(2 ** bits - 1)
    scales = (hi - lo) / maxq
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round((g - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, maxq)
    return q.reshape(n, k).long(), scales, lo


def pack_int(codes, bits):
    """(n, k) codes -> int32 (n, ceil(k / cpw)): element k in word k // cpw at bit (k % cpw) * bits."""
    n, k = codes.shape
    cpw = 32 // bits
    words = -(-k // cpw)
    padded = torch.zeros(n, words * cpw, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    shifts = torch.arange(cpw, device=codes.device) * bits
    packed = (padded.view(n, words, cpw) << shifts).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack_int(qweight, bits, in_features):
    cpw = 32 // bits
    shifts = torch.arange(cpw, device=qweight.device) * bits
    codes = (qweight.to(torch.int64).unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return codes.reshape(qweight.shape[0], qweight.shape[1] * cpw)[:, :in_features]  # (no -1: rows may be 0)


def dequantize_int(qweight, scales, zeros, bits, group_size, compute=torch.float64):
    """q * scale + zero in `compute` (float32 reproduces the kernels' two roundings)."""
    k = scales.shape[1] * group_size
    q = unpack_int(qweight, bits, k).to(compute)
    s = scales.to(compute).repeat_interleave(group_size, dim=1)
    z = zeros.to(compute).repeat_interleave(group_size, dim=1)
    return q * s + z


def qalora_linear(x, qweight, scales, zeros, lora_a, lora_b, scaling, bits, group_size, bias=None,
                  dropout_scale=None, compute=torch.float64):
    """x.W^T + bias + scaling * (pool(x * dropout_scale).A^T).B^T with W dequantized in `compute`."""
    w = dequantize_int(qweight, scales, zeros, bits, group_size, compute)
    xc = x.to(compute)
    xd = xc if dropout_scale is None else xc * dropout_scale.to(compute)
    y = xc @ w.T + scaling * (pool(xd, group_size) @ lora_a.to(compute).T) @ lora_b.to(compute).T
    return y if bias is None else y + bias.to(compute)
