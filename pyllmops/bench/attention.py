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
Shapes (CPU, float32, the dtype of CPU training; head_dim 64): b1 h4 seqlen 512 .. 2048 causal and not; GQA 8:2 at
1024; sliding window 128 at 4096 (SDPA given the equivalent boolean mask); varlen (4 sequences of 128 .. 1024 tokens,
SDPA on the zero-padded batch with a key-padding mask, the usual alternative without varlen); softcap (SDPA has none:
the peer is the eager math Gemma 2's reference attention runs, matmul, softcap * tanh(s / softcap), mask, softmax,
matmul). On CPU the peers of one case are timed
interleaved (A, B, A, B, ...) and each gets the median of its own samples, so load from other processes on a shared
machine hits both alike; ratios are vs_baseline = SDPA median / ours.
"""

import torch

import pyllmops
from pyllmops.ops.attention import route_counts


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
        _run_cpu(bench)


# ---- CPU: every row against torch SDPA on the same math, timed interleaved (harness.measure_together) ----------
def _kernels_ran():
    """What pyllmops' side ran since route_counts was cleared: "ran pyllmops' kernel", "ran torch's CPU flash kernel
    (the CPU route, docs/attention.md)", per direction when they differ."""
    def which(direction):
        ran = [k for k in ("torch", "pyllmops") if route_counts[direction, k]]
        return {"torch": "torch's CPU flash kernel", "pyllmops": "pyllmops' kernel"}[ran[0]] if len(ran) == 1 else (
            "both kernels" if ran else None)
    fwd, bwd = which("fwd"), which("bwd")
    if bwd is None or bwd == fwd:
        return f"ran {fwd}" if fwd else ""
    return f"forward ran {fwd}, backward {bwd}"


def _cpu_modes(bench, kernel, x, providers, inputs, flops_fwd, baseline_name="torch sdpa (cpu)"):
    """fwd (no_grad) and fwd+bwd of each provider {name: f(*inputs)}, paired; inputs require grad."""
    def fwd(f):
        def run():
            with torch.no_grad():
                f(*inputs)
        return run

    g = {}

    def fwd_bwd(name, f):
        def run():
            out = f(*inputs)
            if name not in g:
                g[name] = torch.randn_like(out)
            torch.autograd.grad(out, inputs, g[name])
        return run

    for mode, wrap, flops in (("fwd", lambda n, f: fwd(f), flops_fwd), ("fwd+bwd", fwd_bwd, 3.5 * flops_fwd)):
        route_counts.clear()
        rows = bench.measure_together(kernel, mode, x, [dict(provider=n, fn=wrap(n, f), flops=flops,
                                                             baseline=n == baseline_name) for n, f in providers.items()])
        note = _kernels_ran()
        for row in rows:
            if row["provider"] == "pyllmops" and note:
                row["note"] = note


def _band_mask(sq, sk, causal, window, device):
    from pyllmops.reference.attention import visible_mask

    return visible_mask(sq, sk, window, causal, device=device)


def _cpu_dense(bench, kernel, b, hq, hkv, s, d, causal, window, softcap=0.0):
    dev, dtype = bench.device, torch.float32
    x = (f"b{b} h{hq}" + (f" kv{hkv}" if hkv != hq else "") + f" s{s} d{d}" + (" causal" if causal else "")
         + (f" win{window[0]}" if window != (-1, -1) else "") + (f" softcap{softcap:g}" if softcap else ""))
    flops = 4.0 * visited_area(s, s, causal, window) * d * hq * b
    q = torch.randn(b, hq, s, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=dtype, requires_grad=True)

    def ours(q, k, v):  # BHSD views, no copies
        return pyllmops.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                        window_size=window, softcap=softcap)

    F = torch.nn.functional
    if softcap:  # SDPA has no softcap: the peer is the eager math torch users run for it (Gemma 2's eager attention)
        scale, mask = d ** -0.5, _band_mask(s, s, causal, window, dev)

        def eager(q, k, v):
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            w = torch.tanh(q @ k.transpose(-1, -2) * (scale / softcap)) * softcap
            return torch.softmax(w.masked_fill(~mask, float("-inf")), dim=-1) @ v
        _cpu_modes(bench, kernel, x, {"pyllmops": ours, "torch eager softcap": eager}, (q, k, v), flops,
                   baseline_name="torch eager softcap")
        return
    if window == (-1, -1):
        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != hq)
    else:
        mask = _band_mask(s, s, causal, window, dev)

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hkv != hq)
    _cpu_modes(bench, kernel, x, {"pyllmops": ours, "torch sdpa (cpu)": sdpa}, (q, k, v), flops)


def _cpu_varlen(bench, lens, h, d, causal):
    dev, dtype = bench.device, torch.float32
    n, smax = sum(lens), max(lens)
    x = f"varlen {'+'.join(map(str, lens))} h{h} d{d}" + (" causal" if causal else "")
    flops = 4.0 * sum(visited_area(s, s, causal, (-1, -1)) for s in lens) * d * h
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(n, h, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    # SDPA without varlen: the zero-padded (batch, heads, smax, d) batch with a key-padding (and causal) mask; the
    # padding is part of its cost (built inside the timed call, as a caller would)
    rows = torch.cat([torch.arange(s, device=dev) + b * smax for b, s in enumerate(lens)])
    valid = torch.zeros(len(lens), smax, dtype=torch.bool, device=dev)
    for b, s in enumerate(lens):
        valid[b, :s] = True
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(smax, smax, dtype=torch.bool, device=dev).tril()
    mask = mask | ~valid[:, None, :, None]  # padded query rows see everything (no NaN rows; they are dropped)

    def pad(t):
        out = t.new_zeros(len(lens) * smax, h, d).index_copy(0, rows, t)
        return out.view(len(lens), smax, h, d).transpose(1, 2)

    def sdpa(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
        return o.transpose(1, 2).reshape(len(lens) * smax, h, d).index_select(0, rows)

    def ours(q, k, v):
        return pyllmops.flash_attention_varlen(q, k, v, cu, cu, smax, smax, causal=causal)

    _cpu_modes(bench, "varlen", x, {"pyllmops": ours, "torch sdpa (cpu)": sdpa}, (q, k, v), flops)


def _run_cpu(bench):
    seqlens = [256, 512] if bench.quick else [512, 1024, 2048]
    for causal in (False, True):
        for s in seqlens:
            _cpu_dense(bench, "attention", 1, 4, 4, s, 64, causal, (-1, -1))
    s = 512 if bench.quick else 1024
    for causal in (False, True):
        _cpu_dense(bench, "attention gqa 8:2", 1, 8, 2, s, 64, causal, (-1, -1))
    s = 1024 if bench.quick else 4096
    _cpu_dense(bench, "sliding window 128", 1, 4, 4, s, 64, True, (128, 0))
    lens = [64, 256, 128, 512] if bench.quick else [128, 1024, 256, 512]
    for causal in (False, True):
        _cpu_varlen(bench, lens, 4, 64, causal)
    _cpu_dense(bench, "softcap", 1, 4, 4, 256 if bench.quick else 1024, 64, True, (-1, -1), softcap=30.0)
