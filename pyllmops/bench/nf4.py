"""NF4 benchmarks: quantize, dequantize (GB/s vs the copy ceiling) and the fused decode matmul
(GB/s of weight + activations) against bitsandbytes and a dense torch matmul, when available.

Bytes counted once each: packed weight n/2, scales (4 bytes per block, or 1 per block + 4 per 256
blocks when nested), dense input/output at their element size.
"""
import torch

import pyllmops
from pyllmops.ops.nf4 import NESTED_BLOCKSIZE


def _bnb():
    try:
        import bitsandbytes.functional as F

        return F
    except Exception:
        return None


def _scale_bytes(n, blocksize, nested):
    blocks = -(-n // blocksize)
    return blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 if nested else 4 * blocks


def run(bench):
    dev, F = bench.device, _bnb()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.empty(0, dtype=dtype).element_size()
    if dev.type == "cuda":
        shapes = [(4096, 4096), (14336, 4096), (4096, 14336)] if not bench.quick else [(4096, 4096), (14336, 4096)]
        rows_list = [1, 4, 8, 16]  # up to the tensor-core kernel's limit (ops/nf4.py FUSED_MAX_ROWS_CUDA)
    else:
        shapes = [(1024, 4096)] if bench.quick else [(1024, 4096), (4096, 4096)]
        rows_list = [1, 8]
    blocksize, nested = 64, True
    for (n_out, n_in) in shapes:
        x_label = f"{n_out}x{n_in} bs{blocksize} dq"
        w = torch.randn(n_out, n_in, dtype=dtype, device=dev) * 0.02
        n = w.numel()
        packed, state = pyllmops.quantize_nf4(w, blocksize, nested)
        qbytes = n // 2 + _scale_bytes(n, blocksize, nested)

        # quantize: read w, write packed + scales; dequantize: read packed + scales, write w. Each case's
        # providers alternate call by call (measure_together), as the matmul rows below do.
        quant = [dict(provider="pyllmops", fn=lambda: pyllmops.quantize_nf4(w, blocksize, nested),
                      bytes=n * esize + qbytes)]
        dequant = [dict(provider="pyllmops", fn=lambda: pyllmops.dequantize_nf4(packed, state),
                        bytes=qbytes + n * esize)]
        if F is not None:
            quant.append(dict(provider="bitsandbytes", baseline=True, bytes=n * esize + qbytes,
                              fn=lambda: F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                         compress_statistics=nested)))
            pb, sb = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
            dequant.append(dict(provider="bitsandbytes", fn=lambda: F.dequantize_4bit(pb, sb),
                                bytes=qbytes + n * esize, baseline=True))
        dequant.append(dict(provider="torch copy of the dense weight", fn=lambda: w.clone(), bytes=2 * n * esize))
        bench.measure_together("quantize", "fwd", x_label, quant)
        bench.measure_together("dequantize", "fwd", x_label, dequant)

        # decode matmul: y[m, n_out] = x[m, n_in] W^T, through the public op (fused up to the crossover,
        # ops/nf4.py FUSED_MAX_ROWS_CPU / _CUDA). Each case twice, in the same run: against bitsandbytes (mode fwd)
        # and against the dense matmul of the unquantized weight (mode "fwd vs dense"), so both ratios
        # appear in the vs-baseline column.
        for m in rows_list:
            x = torch.randn(m, n_in, dtype=dtype, device=dev)
            io = (m * n_in + m * n_out) * esize
            label = f"{x_label} m{m}"
            ours = (lambda: pyllmops.nf4_linear(x, packed, state))
            bench.measure("linear", "pyllmops nf4_linear", "fwd", label, ours, bytes=qbytes + io)
            if F is not None:
                import bitsandbytes as bnb

                bench.measure("linear", "bitsandbytes matmul_4bit", "fwd", label,
                              lambda: bnb.matmul_4bit(x, pb.t(), quant_state=sb), bytes=qbytes + io, baseline=True)
            bench.measure("linear", "pyllmops nf4_linear", "fwd vs dense", label, ours, bytes=qbytes + io)
            bench.measure("linear", f"torch dense {str(dtype).replace('torch.', '')}", "fwd vs dense", label,
                          lambda: torch.nn.functional.linear(x, w), bytes=n * esize + io, baseline=True)
