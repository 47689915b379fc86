"""Functional forms of pyllmops' ops with the signatures of torch.nn.functional."""

from pyllmops.ops._common import check_bool, check_tensor, on_cuda
from pyllmops.ops.attention import CPU_DTYPES, CUDA_DTYPES, MAX_HEAD_DIM, _sdpa, _softcap, _softmax_scale, _window


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, window_size=None, softcap=0.0):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention on pyllmops' flash attention kernels.

    Same layout and argument names as torch: query (batch, heads_q, L, head_dim), key/value (batch,
    heads_kv, S, head_dim); returns (batch, heads_q, L, head_dim). The tensors are passed to the kernel
    as transposed views (it takes strides): no copies.

    Semantics as torch: is_causal masks key j > query i with the diagonal through the top-left corner
    (torch's tril(ones(L, S)), also when L != S; pyllmops.flash_attention aligns it bottom-right as
    FlashAttention does); enable_gqa lets heads_q be a multiple of heads_kv. Not supported (ValueError):
    attn_mask tensors and dropout_p > 0.

    window_size (pyllmops extension): (left, right) sliding window relative to the same diagonal: query i
    sees key j iff i - left <= j <= i + right (-1 unbounded; is_causal sets right = 0).

    softcap (pyllmops extension): logit softcap, scores s -> softcap * tanh(s / softcap) before the mask and
    softmax (Gemma 2); 0.0 is off.

    Example:
        >>> q = torch.randn(2, 8, 1024, 64, dtype=torch.bfloat16)
        >>> out = pyllmops.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    """
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported by pyllmops' flash attention (use is_causal / window_size); "
                         f"got a {type(attn_mask).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (attention dropout is not supported), got {dropout_p!r}")
    check_bool("is_causal", is_causal)
    check_bool("enable_gqa", enable_gqa)
    check_tensor("query", query, dim=4)
    check_tensor("query", query, dtypes=CUDA_DTYPES if on_cuda(query) else CPU_DTYPES)
    check_tensor("key", key, dtypes=(query.dtype,), dim=4, device=query.device)
    check_tensor("value", value, dtypes=(query.dtype,), dim=4, device=query.device)
    b, hq, L, d = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.shape[0] != b or key.shape[3] != d:
        raise ValueError(f"key must be (batch={b}, heads, S, head_dim={d}), got {tuple(key.shape)}")
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (query.shape[-1]) must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {d}")
    hkv = key.shape[1]
    if hkv != hq and not (enable_gqa and hkv >= 1 and hq % hkv == 0):
        raise ValueError(f"query has {hq} heads and key {hkv}: equal counts are needed, or enable_gqa=True with "
                         "heads_q a multiple of heads_kv")
    if b < 1 or L < 1 or key.shape[2] < 1:
        raise ValueError(f"batch, L and S must be >= 1, got query {tuple(query.shape)}, key {tuple(key.shape)}")
    window = _window(False, (-1, -1) if window_size is None else window_size, L, key.shape[2])
    s = _softmax_scale(scale, d, name="scale")
    return _sdpa(query, key, value, is_causal=is_causal, scale=s, window_size=window, softcap=_softcap(softcap))
