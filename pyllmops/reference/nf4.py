"""Reference NF4: the plain formulas in PyTorch (see csrc/nf4/nf4.h for the format).

quantize_* follow the exact fp32 arithmetic of the format (the codes are a function of fp32 values);
dequantize and linear take a `compute` dtype: float32 reproduces the kernels' rounding bit for bit,
float64 is the accuracy oracle.
"""
import torch

from pyllmops.ops.nf4 import NF4_CODE


def _midpoints(code):
    code = code.to(torch.float32)
    return (code[:-1] + code[1:]) / 2


def _blocks(x, blocksize):
    """x flattened to fp32 and zero-padded to (n_blocks, blocksize)."""
    flat = x.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _count_below(scaled, mids):
    return (scaled.unsqueeze(-1) > mids).sum(-1)


def quantize_sorted_code(x, code, blocksize, rule="nearest"):
    """Blockwise absmax quantization to a sorted code -> (q uint8 [n], absmax fp32 [n_blocks]).

    rule: "nearest": the number of fp32 midpoints strictly below the scaled value (ties low; the 4-bit
    NF4 rule). "bnb_cuda" / "bnb_cpu": bitsandbytes' 8-bit quantize_blockwise on that device (the
    nested absmax; csrc/nf4/nf4.h): ties to the even index / a 65536-point grid and a lookup table;
    an all-zero block is code 0.
    """
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    code = code.to(torch.float32)
    mids = _midpoints(code)
    if rule == "nearest":
        scaled = blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
        q = _count_below(scaled, mids)
    else:
        scaled = blocks * (1.0 / absmax).unsqueeze(1)
        if rule == "bnb_cuda":
            q = _count_below(scaled, mids)
            tie = (q % 2 == 1) & (q + 1 < code.numel())
            q = q + (tie & (scaled == mids[q.clamp(max=mids.numel() - 1)])).long()
        elif rule == "bnb_cpu":
            grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
            lut = _count_below(grid, mids)
            s = scaled.clamp(-1.0, 1.0)
            idx = ((s + 1.0) * 0.5 * 65535.0 + 0.5).nan_to_num(0.0).to(torch.int64)
            q = lut[idx]
        else:
            raise ValueError(f"rule must be 'nearest', 'bnb_cuda' or 'bnb_cpu', got {rule!r}")
        q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.to(torch.uint8).reshape(-1)[: x.numel()], absmax


def quantize_nf4(w, blocksize):
    """-> (packed uint8 [ceil(n/2), 1], absmax fp32 [n_blocks]); odd n pads the last nibble with 7."""
    q, absmax = quantize_sorted_code(w, torch.tensor(NF4_CODE), blocksize)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 7)])
    packed = (q[0::2] << 4) | q[1::2]
    return packed.view(-1, 1), absmax


def block_scales(state, compute=torch.float32):
    """Per-block absmax of an NF4State, decoding the nested form as bitsandbytes does (fp32)."""
    if not state.nested:
        return state.absmax.to(compute)
    idx = torch.arange(state.absmax.numel(), device=state.absmax.device) // state.nested_blocksize
    v = state.nested_code.float()[state.absmax.long()] * state.nested_absmax.float()[idx]
    v = v + state.nested_offset.float()
    return v.to(compute)


def unpack_codes(packed, numel):
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)
    return q[:numel].long()


def dequantize_nf4(packed, state, compute=torch.float64, out_dtype=None):
    """code[q] * absmax in `compute`, then cast to out_dtype (default: compute)."""
    q = unpack_codes(packed, state.numel)
    values = torch.tensor(NF4_CODE, dtype=compute, device=packed.device)[q]
    scales = block_scales(state, compute)
    block = torch.arange(state.numel, device=packed.device) // state.blocksize
    out = (values * scales[block]).view(state.shape)
    return out if out_dtype is None else out.to(out_dtype)


def nf4_linear(x, packed, state, bias=None, compute=torch.float64):
    w = dequantize_nf4(packed, state, compute)
    y = x.to(compute) @ w.T
    return y if bias is None else y + bias.to(compute)
