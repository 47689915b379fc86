"""Flash attention benchmarks: forward, backward and forward + backward TFLOP/s against torch SDPA with each
backend the device offers (flash, efficient, cuDNN on CUDA; the default CPU kernel on CPU) and FlexAttention
for sliding windows, plus the peak memory of each call.

FLOPs: FlashAttention's count over the visited area A (query/key pairs the mask lets through, counted
exactly): forward 4 * A * d * heads * batch, backward 2.5x that, forward + backward 3.5x. Our backward does
more work than that count (two passes, 7 tile matmuls instead of 5; see csrc/attention/attention.h), so
its TFLOP/s are "useful" FLOP/s as for every provider.
Shapes (CUDA): FlashAttention's benchmark convention, batch * seqlen = 16k tokens, hidden 2048
(heads = 2048 / head_dim), seqlen 512 .. 16k; sliding window 4096 at seqlen 4k .. 32k (batch 1) against
full causal at the same shape.
"""
import torch

import pyllmops


def visited_area(sq, sk, causal, window):
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq, dtype=torch.int64)
    lo = torch.zeros_like(i) if left < 0 else (i + sk - sq - left).clamp(min=0)
    hi = torch.full_like(i, sk - 1) if right < 0 else (i + sk - sq + right).clamp(max=sk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


def _sdpa_backends(device):
    """(name, context manager factory) for each SDPA backend to try; a backend that cannot run a case is
    recorded as an error row by the harness."""
    if device.type != "cuda":
        return [("torch sdpa (cpu default)", None)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = [("torch sdpa flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
           ("torch sdpa efficient", lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION))]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out.append(("torch sdpa cudnn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)))
    return out


def _flex(window, causal, b, h, sq, sk, device):
    """A compiled FlexAttention call with the same mask (bottom-right aligned band), or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    left, right = window
    if causal:
        right = 0
    shift = sk - sq

    def band(b_, h_, qi, kj):
        ok = kj >= 0
        if left >= 0:
            ok = ok & (kj >= qi + shift - left)
        if right >= 0:
            ok = ok & (kj <= qi + shift + right)
        return ok

    mask = create_block_mask(band, None, None, sq, sk, device=device)
    fn = torch.compile(flex_attention)
    return lambda q, k, v: fn(q, k, v, block_mask=mask)


def _measure_modes(bench, kernel, provider, x, fwd, inputs, flops_fwd, baseline=False):
    """fwd, bwd and fwd+bwd of `fwd(*inputs)` (inputs require grad); peak memory recorded per row."""
    dev = bench.device
    g = [None]

    def run_fwd():
        return fwd(*inputs)

    def run_bwd_setup():
        out = run_fwd()
        if g[0] is None:
            g[0] = torch.randn_like(out)
        return out

    def fwd_bwd():
        out = run_fwd()
        torch.autograd.grad(out, inputs, g[0])

    for mode, fn, mul in (("fwd", lambda: run_fwd(), 1.0), ("fwd+bwd", fwd_bwd, 3.5)):
        if mode == "fwd+bwd":
            try:
                run_bwd_setup()
            except Exception as e:
                bench.rows.append(dict(kernel=kernel, provider=provider, mode=mode, x=x,
                                       error=f"{type(e).__name__}: {e}"))
                continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        if mode == "fwd":
            with torch.no_grad():
                row = bench.measure(kernel, provider, mode, x, fn, flops=flops_fwd * mul, baseline=baseline)
        else:
            row = bench.measure(kernel, provider, mode, x, fn, flops=flops_fwd * mul, baseline=baseline)
        if row is not None and dev.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    # backward alone: graph built once, gradients taken repeatedly
    try:
        out = run_bwd_setup()
        bench.measure(kernel, provider, "bwd", x,
                      lambda: torch.autograd.grad(out, inputs, g[0], retain_graph=True), flops=flops_fwd * 2.5,
                      baseline=baseline)
    except Exception as e:
        bench.rows.append(dict(kernel=kernel, provider=provider, mode="bwd", x=x, error=f"{type(e).__name__}: {e}"))


def _case(bench, kernel, b, h, sq, sk, d, causal, window, dtype, with_flex=False):
    dev = bench.device
    x = f"b{b} h{h} s{sq} d{d}" + (" causal" if causal else "") + (f" win{window}" if window != (-1, -1) else "")
    flops = 4.0 * visited_area(sq, sk, causal, window) * d * h * b
    q = torch.randn(b, h, sq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, sk, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, sk, d, device=dev, dtype=dtype, requires_grad=True)

    def ours(q, k, v):  # BHSD views, no copies
        return pyllmops.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                        window_size=window)

    _measure_modes(bench, kernel, "pyllmops", x, ours, (q, k, v), flops)
    if window == (-1, -1) and sq == sk:  # SDPA has no window; its causal is top-left (same as ours at sq == sk)
        for name, ctx in _sdpa_backends(dev):
            def sdpa(q, k, v, ctx=ctx):
                if ctx is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                with ctx():
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

            _measure_modes(bench, kernel, name, x, sdpa, (q, k, v), flops, baseline=name.endswith("flash") or
                           dev.type != "cuda")
    if with_flex:
        try:
            flex = _flex(window, causal, b, h, sq, sk, dev)
        except Exception as e:
            flex = None
            bench.rows.append(dict(kernel=kernel, provider="flex_attention", mode="fwd", x=x,
                                   error=f"{type(e).__name__}: {e}"))
        if flex is not None:
            _measure_modes(bench, kernel, "flex_attention", x, flex, (q, k, v), flops, baseline=True)


def run(bench):
    dev = bench.device
    if dev.type == "cuda":
        dtype = torch.bfloat16
        seqlens = [1024, 4096] if bench.quick else [512, 1024, 2048, 4096, 8192, 16384]
        for d in (64, 128):
            h = 2048 // d
            for causal in (False, True):
                for s in seqlens:
                    _case(bench, "attention", max(1, 16384 // s), h, s, s, d, causal, (-1, -1), dtype)
        win_seqlens = [4096, 16384] if bench.quick else [4096, 8192, 16384, 32768]
        for s in win_seqlens:
            _case(bench, "sliding window 4096", 1, 16, s, s, 128, True, (4096, 0), dtype, with_flex=True)
            _case(bench, "sliding window 4096", 1, 16, s, s, 128, True, (-1, -1), dtype)  # full causal reference
    else:
        dtype = torch.float32
        seqlens = [256, 512] if bench.quick else [512, 1024, 2048]
        for causal in (False, True):
            for s in seqlens:
                _case(bench, "attention", 1, 4, s, s, 64, causal, (-1, -1), dtype)
        s = 1024 if bench.quick else 4096
        _case(bench, "sliding window 128", 1, 4, s, s, 64, True, (128, 0), dtype)
        _case(bench, "sliding window 128", 1, 4, s, s, 64, True, (-1, -1), dtype)
