"""FlashAttention-2's call signatures on pyllmops' kernels, so code written for `flash_attn` runs as it is:

    from pyllmops import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    # instead of: from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

The argument order (positional calls included), layouts and mask conventions are FlashAttention 2's:
q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim) (GQA when nheads_k
divides nheads), causal aligned bottom-right, window_size=(left, right) with -1 unbounded, softmax_scale
default 1/sqrt(headdim). flash_attn_func / flash_attn_varlen_func run pyllmops.flash_attention(_varlen)
(differentiable); flash_attn_with_kvcache runs pyllmops.paged_attention over the cache (inference).

Not supported, NotImplementedError naming the argument: dropout_p > 0, alibi_slopes, return_attn_probs
(return_softmax_lse for the KV cache), softcap > 0 until pyllmops.flash_attention takes softcap (and on
the KV cache), and for the KV cache: causal=False with more than one query per sequence, cache_leftpad.
pyllmops also accepts float32 on the CPU (FlashAttention takes fp16/bf16 only).
"""
import inspect

import torch

from pyllmops.ops.attention import flash_attention, flash_attention_varlen
from pyllmops.ops.paged import paged_attention, reshape_and_cache

_HAS_SOFTCAP = "softcap" in inspect.signature(flash_attention).parameters


def _unsupported(dropout_p=0.0, alibi_slopes=None, return_attn_probs=False, softcap=0.0, fn="flash_attn_func",
                 probs_name="return_attn_probs"):
    if dropout_p:
        raise NotImplementedError(f"{fn}: dropout_p={dropout_p} is not supported by pyllmops (attention dropout); "
                                  f"pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes is not supported by pyllmops")
    if return_attn_probs:
        raise NotImplementedError(f"{fn}: {probs_name}=True is not supported by pyllmops (use "
                                  f"pyllmops.flash_attention(..., return_lse=True) for the log-sum-exp)")
    if softcap and not _HAS_SOFTCAP:
        raise NotImplementedError(f"{fn}: softcap={softcap} is not supported by this build of pyllmops")
    return {"softcap": float(softcap)} if softcap else {}


def _window(window_size):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    return tuple(window_size)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FlashAttention 2's flash_attn_func: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k,
    nheads_k, headdim) -> out like q. Differentiable (pyllmops.flash_attention).

    Example:
        >>> q = torch.randn(2, 128, 8, 64); k = v = torch.randn(2, 128, 2, 64)
        >>> out = pyllmops.flash_attn_func(q, k, v, 0.0, None, True)        # positional, as FlashAttention
    """
    extra = _unsupported(dropout_p, alibi_slopes, return_attn_probs, softcap)
    return flash_attention(q, k, v, causal=causal, window_size=_window(window_size), softmax_scale=softmax_scale,
                           deterministic=deterministic, **extra)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """FlashAttention 2's flash_attn_varlen_func: packed q (total_q, nheads, headdim), k/v (total_k,
    nheads_k, headdim), int32 cu_seqlens (batch + 1,), host-int max_seqlens -> out (total_q, nheads,
    headdim). Differentiable (pyllmops.flash_attention_varlen).

    With block_table (int32 (batch, max_blocks)), k and v are paged caches (num_blocks, block_size,
    nheads_k, headdim) and sequence b's keys are its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] cache
    positions: pyllmops.paged_attention runs (inference; causal, or one query per sequence).

    Example:
        >>> cu = torch.tensor([0, 100, 250], dtype=torch.int32)
        >>> q = torch.randn(250, 8, 64); k = v = torch.randn(250, 2, 64)
        >>> out = pyllmops.flash_attn_varlen_func(q, k, v, cu, cu, 150, 150, 0.0, None, True)
    """
    extra = _unsupported(dropout_p, alibi_slopes, return_attn_probs, softcap, fn="flash_attn_varlen_func")
    window = _window(window_size)
    if block_table is None:
        return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                      window_size=window, softmax_scale=softmax_scale, deterministic=deterministic,
                                      **extra)
    left = _paged_window(causal, window, max_seqlen_q, "flash_attn_varlen_func")
    if extra:
        raise NotImplementedError(f"flash_attn_varlen_func: softcap={softcap} with block_table is not supported")
    seq_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    return paged_attention(q, k, v, block_table, seq_lens, softmax_scale=softmax_scale, window_left=left,
                           cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max(int(max_seqlen_q), 1))


def _paged_window(causal, window, seqlen_q, fn):
    """window_left for paged_attention, whose queries are the last positions of their sequence, causal."""
    left, right = window
    if not causal and seqlen_q > 1:
        raise NotImplementedError(f"{fn}: causal=False with {seqlen_q} queries per sequence is not supported on the "
                                  f"KV cache (its queries are the newest positions: pass causal=True)")
    if not isinstance(left, int) or isinstance(left, bool) or left < -1:
        raise ValueError(f"window_size[0] must be an int >= -1, got {left!r}")
    return left


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of x (batch, s, h, d) at integer positions (batch, s), on the first 2 * cos.shape[1]
    dims: interleaved pairs (0, 1), (2, 3), ... (GPT-J) or halves (GPT-NeoX), as FlashAttention."""
    rd = 2 * cos.shape[1]
    c = cos[positions].unsqueeze(2).to(torch.float32)  # (batch, s, 1, rd / 2)
    s = sin[positions].unsqueeze(2).to(torch.float32)
    xr, rest = x[..., :rd].float(), x[..., rd:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :rd // 2], xr[..., rd // 2:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([out.to(x.dtype), rest], dim=-1)


def _as_pages(k_cache, v_cache, cache_batch_idx, batch):
    """A contiguous non-paged cache (batch_cache, seqlen_cache, h, d) viewed as pages (no copy) of
    block_size rows, the largest power of two in [8, 256] dividing seqlen_cache, and its block table."""
    bc, sc = k_cache.shape[:2]
    bs = next((b for b in (256, 128, 64, 32, 16, 8) if sc % b == 0), None)
    if bs is None or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise NotImplementedError(f"flash_attn_with_kvcache: a non-paged cache needs contiguous k_cache/v_cache with "
                                  f"seqlen_cache a multiple of 8, got shape {tuple(k_cache.shape)}; pass a paged "
                                  f"cache with block_table")
    per = sc // bs
    kp = k_cache.view(bc * per, bs, *k_cache.shape[2:])
    vp = v_cache.view(bc * per, bs, *v_cache.shape[2:])
    rows = (torch.arange(batch, device=k_cache.device) if cache_batch_idx is None
            else cache_batch_idx.to(k_cache.device, torch.long))
    table = (rows[:, None] * per + torch.arange(per, device=k_cache.device)[None]).to(torch.int32)
    return kp, vp, table


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False, cache_leftpad=None):
    """FlashAttention 2's flash_attn_with_kvcache on pyllmops.paged_attention (inference, no gradients).

    Args (FlashAttention's):
        q: (batch, seqlen_q, nheads, headdim): the newest seqlen_q positions of each sequence.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with block_table the pages
            (num_blocks, page_block_size, nheads_k, headdim) (page_block_size a power of two in [8, 256]).
        k, v: optional (batch, seqlen_new, nheads_k, headdim) written into the cache in place at positions
            cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1 before attending.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2): q and k are rotated at their
            positions (cache_seqlens + i) first; rotary_interleaved selects GPT-J pairs (True) or halves.
        cache_seqlens: int or int32 (batch,): keys already in the cache per sequence (before k/v are
            appended). None means 0 when k/v are given, and is an error otherwise.
        cache_batch_idx: int (batch,): which cache rows the batch uses (non-paged caches).
        block_table: int32 (batch, max_blocks): the pages of each sequence.
        softmax_scale, causal, window_size, softcap: as flash_attn_func; num_splits 0 = pyllmops' plan.

    Returns:
        out (batch, seqlen_q, nheads, headdim).

    Example:
        >>> k_cache = torch.zeros(2, 256, 2, 64); v_cache = torch.zeros(2, 256, 2, 64)
        >>> lens = torch.tensor([10, 37], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 8, 64), torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 64)
        >>> out = pyllmops.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
    """
    fn = "flash_attn_with_kvcache"
    _unsupported(0.0, alibi_slopes, return_softmax_lse, 0.0, fn=fn, probs_name="return_softmax_lse")
    if softcap:
        raise NotImplementedError(f"{fn}: softcap={softcap} is not supported by pyllmops' paged attention")
    if cache_leftpad is not None:
        raise NotImplementedError(f"{fn}: cache_leftpad is not supported by pyllmops")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (batch, seqlen_q, nheads, headdim), got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    batch, sq = q.shape[:2]
    left = _paged_window(causal, _window(window_size), sq, fn)
    dev = q.device
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: k and v must be given together")
    if cache_seqlens is None:
        if k is None:
            raise ValueError(f"{fn}: cache_seqlens is needed when no new k/v are appended")
        cache_seqlens = 0
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=dev)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (batch,):
        raise ValueError(f"{fn}: cache_seqlens must be an int or a ({batch},) tensor, got {cache_seqlens!r}")
    lens = cache_seqlens.to(dev, torch.long)
    if block_table is None:
        kp, vp, table = _as_pages(k_cache, v_cache, cache_batch_idx, batch)
    else:
        if cache_batch_idx is not None:
            raise NotImplementedError(f"{fn}: cache_batch_idx with block_table is not supported (FlashAttention "
                                      f"neither)")
        kp, vp, table = k_cache, v_cache, block_table
    bs = kp.shape[1]
    new = 0 if k is None else k.shape[1]
    if rotary_cos is not None:
        pos_q = lens[:, None] + (new - sq) + torch.arange(sq, device=dev)[None]
        q = _rotate(q, rotary_cos, rotary_sin, pos_q.clamp(min=0), rotary_interleaved)
        if k is not None:
            pos_k = lens[:, None] + torch.arange(new, device=dev)[None]
            k = _rotate(k, rotary_cos, rotary_sin, pos_k, rotary_interleaved)
    if k is not None:
        if k.shape[0] != batch or v.shape != k.shape:
            raise ValueError(f"{fn}: k and v must be (batch={batch}, seqlen_new, nheads_k, headdim) alike, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        pos = lens[:, None] + torch.arange(new, device=dev)[None]                # (batch, new)
        blk = pos // bs
        if int(blk.max()) >= table.shape[1] if blk.numel() else False:
            raise ValueError(f"{fn}: appending {new} tokens overflows the cache of {table.shape[1] * bs} positions "
                             f"per sequence (cache_seqlens.max() = {int(lens.max())})")
        slots = table.long().gather(1, blk) * bs + pos % bs
        reshape_and_cache(k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), kp, vp, slots.reshape(-1))
    seq_lens = (lens + new).to(torch.int32)
    splits = None if not num_splits else int(num_splits)
    if sq == 1:
        out = paged_attention(q[:, 0], kp, vp, table, seq_lens, softmax_scale=softmax_scale, window_left=left,
                              num_splits=splits)
        return out.unsqueeze(1)
    cu = torch.arange(0, (batch + 1) * sq, sq, dtype=torch.int32, device=dev)
    out = paged_attention(q.reshape(batch * sq, *q.shape[2:]), kp, vp, table, seq_lens, softmax_scale=softmax_scale,
                          window_left=left, cu_seqlens_q=cu, max_seqlen_q=sq, num_splits=splits)
    return out.view(batch, sq, *out.shape[1:])
