"""Reference paged attention: gather each sequence's K/V from the cache through its block table,
then dense masked attention in a chosen precision (float64 in tests). See csrc/paged/paged.h for
the semantics (positions, causal multi-token queries, window_left, GQA, softcap).

NaN policy (docs/paged.md): a non-finite value in q, K or V reaches exactly the outputs that see it.
Keys a query does not see are left out of its sum (never multiplied by a weight 0, which would turn
inf or NaN there into NaN); a query that sees no key gives 0; a query whose every visible score is
-inf gives NaN (0 / 0)."""
import math

import torch


def gather_kv(cache, block_table, seq_len):
    """[seq_len, num_kv_heads, head_dim]: token t from block block_table[t // block_size]."""
    bs = cache.shape[1]
    t = torch.arange(seq_len, device=cache.device)
    blocks = block_table.long()[t // bs]
    return cache[blocks, t % bs]


def attention(q, k, v, *, softmax_scale, positions, window_left=-1, softcap=0.0, compute=torch.float64):
    """q [n, heads_q, d] at key positions `positions` (n,), k/v [seq_len, heads_kv, d]; query at p
    sees keys max(0, p - window_left) .. p. Rows that see nothing give 0."""
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    j = torch.arange(k.shape[0], device=q.device)
    p = positions.to(q.device)[:, None]
    mask = j[None, :] <= p
    if window_left >= 0:
        mask &= j[None, :] >= p - window_left
    finite = bool(torch.isfinite(qc).all() and torch.isfinite(kc).all() and torch.isfinite(vc).all())
    if not finite:  # row by row over exactly the visible keys, so masked non-finite values stay out
        out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], dtype=compute, device=q.device)
        for i in range(q.shape[0]):
            keys = mask[i].nonzero()[:, 0]
            if keys.numel() == 0:
                continue
            s = torch.einsum("hd,khd->hk", qc[i], kc[keys]) * softmax_scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            w = torch.softmax(s, dim=-1)
            out[i] = torch.einsum("hk,khd->hd", w, vc[keys])
        return out
    s = torch.einsum("qhd,khd->hqk", qc, kc) * softmax_scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[None], float("-inf"))
    w = torch.softmax(s, dim=-1)
    w = w.masked_fill(~mask.any(-1)[None, :, None], 0.0)  # rows that see no key: 0 (only those)
    return torch.einsum("hqk,khd->qhd", w, vc)


def paged_attention(q, key_cache, value_cache, block_tables, seq_lens, *, softmax_scale=None, window_left=-1,
                    softcap=0.0, cu_seqlens_q=None, compute=torch.float64):
    """Same contract as pyllmops.paged_attention; returns `compute` dtype."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    n = block_tables.shape[0]
    cu = list(range(n + 1)) if cu_seqlens_q is None else cu_seqlens_q.tolist()
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    for s in range(n):
        L = int(seq_lens[s])
        q0, q1 = cu[s], cu[s + 1]
        if q1 == q0:
            continue
        k = gather_kv(key_cache, block_tables[s], L)
        v = gather_kv(value_cache, block_tables[s], L)
        pos = torch.arange(L - (q1 - q0), L, device=q.device)
        out[q0:q1] = attention(q[q0:q1], k, v, softmax_scale=scale, positions=pos, window_left=window_left,
                               softcap=softcap, compute=compute)
    return out
