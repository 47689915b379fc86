"""Paged attention decode benchmark: GB/s of K/V actually read (plus q and out) against the device's
measured copy bandwidth, for batch x context x GQA group x block size; peers on the same inputs:
gather-then-SDPA (torch: index the cache through the block tables, then scaled_dot_product_attention;
the baseline) and flashinfer's BatchDecodeWithPagedKVCacheWrapper when importable.

Bytes counted once each: every sequence's seq_len keys of K and V for each kv head (head_dim elements),
q and out. Block tables are shuffled (non-contiguous pages), as in a serving cache after churn.
"""
import torch

import pyllmops


def _flashinfer():
    try:
        import flashinfer

        return flashinfer
    except Exception:
        return None


def _cases(bench):
    if bench.device.type == "cuda":
        heads_q, head_dim = 32, 128
        if bench.quick:
            grid = [(b, c) for b in (1, 16, 128) for c in (512, 8192)] + [(1, 32768)]
            return heads_q, head_dim, grid, (1, 8), (16, 128)
        grid = [(b, c) for b in (1, 4, 16, 64, 256) for c in (512, 2048, 8192, 32768)]
        return heads_q, head_dim, grid, (1, 4, 8), (16, 128)
    heads_q, head_dim = 8, 128
    if bench.quick:
        return heads_q, head_dim, [(1, 512), (4, 2048)], (1, 8), (16,)
    return heads_q, head_dim, [(1, 512), (1, 8192), (8, 2048), (32, 512)], (1, 4, 8), (16, 128)


def _gather_sdpa(q, kc, vc, bt, seq_len):
    """Baseline: gather every sequence's pages into dense K/V, then SDPA (all sequences have seq_len keys)."""
    b = q.shape[0]
    k = kc[bt.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2)  # [b, heads_kv, seq_len, d]
    v = vc[bt.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q.view(b, -1, 1, q.shape[-1]), k, v,
                                                           enable_gqa=k.shape[1] != q.shape[1])
    return out.view_as(q)


def run(bench):
    dev = bench.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.empty(0, dtype=dtype).element_size()
    heads_q, d, grid, groups, block_sizes = _cases(bench)
    fi = _flashinfer() if dev.type == "cuda" else None
    for bs in block_sizes:
        for group in groups:
            heads_kv = heads_q // group
            for batch, ctx in grid:
                if 2 * batch * ctx * heads_kv * d * esize > (2 << 30):
                    continue  # keep the pool (and the baseline's gathered copy) within a few GiB
                pages = -(-ctx // bs)
                num_blocks = batch * pages
                kc = torch.randn(num_blocks, bs, heads_kv, d, device=dev, dtype=dtype)
                vc = torch.randn_like(kc)
                bt = torch.randperm(num_blocks, device=dev, dtype=torch.int64).to(torch.int32).view(batch, pages)
                sl = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
                q = torch.randn(batch, heads_q, d, device=dev, dtype=dtype)
                nbytes = (2 * batch * ctx * heads_kv * d + 2 * q.numel()) * esize
                x = f"b{batch} ctx{ctx} gqa{group} bs{bs}"
                bench.measure("decode", "pyllmops", "fwd", x,
                              lambda: pyllmops.paged_attention(q, kc, vc, bt, sl), bytes=nbytes)
                bench.measure("decode", "gather+sdpa", "fwd", x, lambda: _gather_sdpa(q, kc, vc, bt, ctx),
                              bytes=nbytes, baseline=True)
                if fi is not None:
                    try:
                        ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
                        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
                        indptr = torch.arange(0, num_blocks + 1, pages, dtype=torch.int32, device=dev)
                        last = torch.full((batch,), ctx - (pages - 1) * bs, dtype=torch.int32, device=dev)
                        wrapper.plan(indptr, bt.flatten(), last, heads_q, heads_kv, d, bs, q_data_type=dtype,
                                     kv_data_type=dtype)
                        bench.measure("decode", "flashinfer", "fwd", x, lambda: wrapper.run(q, (kc, vc)),
                                      bytes=nbytes)
                    except Exception as e:  # an API drift or unsupported case: recorded, not fatal
                        bench.rows.append(dict(kernel="decode", provider="flashinfer", mode="fwd", x=x,
                                               error=f"{type(e).__name__}: {e}"))
                del kc, vc
