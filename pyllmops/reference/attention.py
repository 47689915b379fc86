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


def attention(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, top_left=False, softcap=0.0,
              exact=None):
    """q (batch, seqlen_q, heads_q, d), k/v (batch, seqlen_k, heads_kv, d) -> (out like q, lse (batch,
    heads_q, seqlen_q)). Rows that see no key give out 0 and lse -inf, with zero gradients. softcap > 0: the
    scores s become softcap * tanh(s / softcap) before the mask and softmax.

    Non-finite inputs (the NaN policy, docs/attention.md): a masked (query, key) pair contributes nothing to any
    output or gradient, whatever its values; a visible pair does its arithmetic, so a NaN reaches exactly what it
    touches. With non-finite inputs the products are taken element by element with the masked pairs zeroed
    before multiplying (a matmul would spread a masked NaN as 0 * NaN); that materializes (b, h, sq, sk, d), so
    keep such cases small. exact=True forces that mode (for a non-finite output gradient), None picks it when an
    input is not finite."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    group = hq // hkv
    kh = k.repeat_interleave(group, dim=2) if group > 1 else k
    vh = v.repeat_interleave(group, dim=2) if group > 1 else v
    ok = visible_mask(sq, sk, window_size, causal, top_left, q.device)
    if exact is None:
        exact = not all(bool(torch.isfinite(t).all()) for t in (q, k, v))
    if exact:
        ok5 = ok.view(1, 1, sq, sk, 1)
        k5 = torch.where(ok5, kh.permute(0, 2, 1, 3).unsqueeze(2), 0.0)  # (b, h, sq, sk, d), masked keys zeroed
        s = (q.permute(0, 2, 1, 3).unsqueeze(3) * k5).sum(-1) * scale
    else:
        s = torch.einsum("bihd,bjhd->bhij", q, kh) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    empty_row = ~ok.any(dim=1)  # (sq,)
    # Empty rows get 0 scores so logsumexp (and its gradient) stays finite; they are zeroed below.
    s_for_lse = torch.where(ok, s, torch.where(empty_row.view(-1, 1), torch.zeros_like(s), -math.inf))
    lse = torch.logsumexp(s_for_lse, dim=-1)
    lse = torch.where(empty_row, torch.full_like(lse, -math.inf), lse)
    lse_safe = torch.where(empty_row, torch.zeros_like(lse), lse)
    p = torch.where(ok, torch.exp(torch.where(ok, s - lse_safe.unsqueeze(-1), -math.inf)), torch.zeros_like(s))
    if exact:
        v5 = torch.where(ok.view(1, 1, sq, sk, 1), vh.permute(0, 2, 1, 3).unsqueeze(2), 0.0)
        out = (p.unsqueeze(-1) * v5).sum(3).permute(0, 2, 1, 3)
    else:
        out = torch.einsum("bhij,bjhd->bihd", p, vh)
    return out, lse


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, window_size=(-1, -1), softmax_scale=None,
                     softcap=0.0):
    """Packed sequences: q (total_q, heads_q, d), k/v (total_k, heads_kv, d) -> (out like q, lse (heads_q,
    total_q)); sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb, kb, vb = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        o, l = attention(qb.unsqueeze(0), kb.unsqueeze(0), vb.unsqueeze(0), causal, window_size, softmax_scale,
                         softcap=softcap)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)
