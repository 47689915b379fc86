"""Attention, written as the plain formula: the oracle the flash attention kernels are tested against.

Runs in any dtype (tests use float64) and materializes the full seqlen_q x seqlen_k score matrix, so
it is for small shapes only. Autograd through it gives the reference gradients.
"""
import math

import torch


def visible_mask(seqlen_q, seqlen_k, window_size=(-1, -1), causal=False, top_left=False, device="cpu"):
    """Bool (seqlen_q, seqlen_k): query i sees key j iff i + shift - left <= j <= i + shift + right,
    shift = seqlen_k - seqlen_q (bottom-right, FlashAttention) or 0 (top-left, torch SDPA); a bound of
    -1 is unbounded; causal sets right = 0."""
    left, right = window_size
    if causal:
        right = 0
    shift = 0 if top_left else seqlen_k - seqlen_q
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i + shift - left
    if right >= 0:
        ok &= j <= i + shift + right
    return ok


def attention(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, top_left=False):
    """q (batch, seqlen_q, heads_q, d), k/v (batch, seqlen_k, heads_kv, d) -> (out like q, lse (batch,
    heads_q, seqlen_q)). Rows that see no key give out 0 and lse -inf, with zero gradients."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    group = hq // hkv
    kh = k.repeat_interleave(group, dim=2) if group > 1 else k
    vh = v.repeat_interleave(group, dim=2) if group > 1 else v
    s = torch.einsum("bihd,bjhd->bhij", q, kh) * scale
    ok = visible_mask(sq, sk, window_size, causal, top_left, q.device)
    empty_row = ~ok.any(dim=1)  # (sq,)
    # Empty rows get 0 scores so logsumexp (and its gradient) stays finite; they are zeroed below.
    s_for_lse = torch.where(ok, s, torch.where(empty_row.view(-1, 1), torch.zeros_like(s), -math.inf))
    lse = torch.logsumexp(s_for_lse, dim=-1)
    lse = torch.where(empty_row, torch.full_like(lse, -math.inf), lse)
    lse_safe = torch.where(empty_row, torch.zeros_like(lse), lse)
    p = torch.where(ok, torch.exp(torch.where(ok, s - lse_safe.unsqueeze(-1), -math.inf)), torch.zeros_like(s))
    out = torch.einsum("bhij,bjhd->bihd", p, vh)
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, window_size=(-1, -1), softmax_scale=None):
    """Packed sequences: q (total_q, heads_q, d), k/v (total_k, heads_kv, d) -> (out like q, lse (heads_q,
    total_q)); sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb, kb, vb = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        o, l = attention(qb.unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), causal, window_size, softmax_scale)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
