"""Reference paged attention: gather each sequence's K/V from the cache through its block table,
then dense masked attention in a chosen precision (float64 in tests). See csrc/paged/paged.h for
the semantics (positions, causal multi-token queries, window_left, GQA)."""
import math

import torch


def gather_kv(cache, block_table, seq_len):
    """[seq_len, num_kv_heads, head_dim]: token t from block block_table[t // block_size]."""
    bs = cache.shape[1]
    t = torch.arange(seq_len, device=cache.device)
    blocks = block_table.long()[t // bs]
    return cache[blocks, t % bs]


def attention(q, k, v, *, softmax_scale, positions, window_left=-1, compute=torch.float64):
    """q [n, heads_q, d] at key positions `positions` (n,), k/v [seq_len, heads_kv, d]; query at p
    sees keys max(0, p - window_left) .. p. Rows that see nothing give 0."""
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", qc, kc) * softmax_scale
    j = torch.arange(k.shape[0], device=q.device)
    p = positions.to(q.device)[:, None]
    mask = j[None, :] <= p
    if window_left >= 0:
        mask &= j[None, :] >= p - window_left
    s = s.masked_fill(~mask[None], float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: 0
    return torch.einsum("hqk,khd->qhd", w, vc)


def paged_attention(q, key_cache, value_cache, block_tables, seq_lens, *, softmax_scale=None, window_left=-1,
                    cu_seqlens_q=None, compute=torch.float64):
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
                               compute=compute)
    return out
