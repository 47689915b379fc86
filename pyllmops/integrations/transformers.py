"""transformers integration: importing this module registers the attention implementation "pyllmops".

    import pyllmops.integrations.transformers  # noqa: F401
    model.set_attn_implementation("pyllmops")   # or from_pretrained(..., attn_implementation="pyllmops")

Attention then runs on pyllmops.flash_attention (pyllmops.flash_attention_varlen when a padding mask
is present), through transformers' registration points, no patching: AttentionInterface (the
attention function) and masking_utils.AttentionMaskInterface (the mask function, which hands the
attention a 2-D padding mask, or None when nothing is padded, instead of a 4-D mask).

Semantics: causal unless the module says otherwise (module.is_causal / is_causal=); GQA natively (no
repeat of K/V); a model's sliding_window W as transformers defines it (key j visible from query i iff
i - j < W, i.e. pyllmops window_size=(W - 1, 0)); with a KV cache the queries are the last positions
(bottom-right alignment). Not supported (ValueError): attention dropout in training, logit soft-capping,
4-D custom masks. On CUDA the kernels take fp16/bf16: float32 inputs are computed in bfloat16.
"""
import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from pyllmops.ops.attention import flash_attention, flash_attention_varlen

NAME = "pyllmops"


def pyllmops_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  **kwargs):
    """Mask function for AttentionMaskInterface: the 2-D (batch, kv_length) padding mask, or None when no
    key is padded (the kernel builds causal / window masks itself)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    return None if (mask.shape[1] == kv_length and bool(mask.all())) else mask


def _unpad(x, mask):
    """x (b, s, h, d), mask (b, s) bool -> packed (total, h, d), row indices, int32 cu_seqlens, max length."""
    b, s = mask.shape
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    lens = mask.sum(-1, dtype=torch.int32)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(lens, 0)
    return x.reshape(b * s, *x.shape[2:]).index_select(0, idx), idx, cu, int(lens.max().item()) if b else 0


def pyllmops_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                               sliding_window=None, softcap=None, **kwargs):
    """AttentionInterface function: query (b, heads_q, sq, d), key/value (b, heads_kv, sk, d) ->
    ((b, sq, heads_q, d), None)."""
    if dropout and module.training:
        raise ValueError(f"attention dropout is not supported by the pyllmops attention implementation, got "
                         f"dropout={dropout}")
    if softcap is not None:
        raise ValueError(f"logit soft-capping is not supported by the pyllmops attention implementation, got "
                         f"softcap={softcap}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"the pyllmops attention implementation takes a 2-D padding mask (from its mask function), "
                         f"got a {attention_mask.dim()}-D attention_mask of shape {tuple(attention_mask.shape)}")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    left = -1 if sliding_window is None else int(sliding_window) - 1
    window = (left, 0 if causal else left)
    dtype = query.dtype
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (b, s, h, d) views
    if q.is_cuda and dtype == torch.float32:
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    if attention_mask is None:
        out = flash_attention(q, k, v, causal=causal, window_size=window, softmax_scale=scaling)
        return out.to(dtype), None
    b, sq = q.shape[:2]
    mask = attention_mask.bool()
    qp, q_idx, cu_q, max_q = _unpad(q, mask[:, -sq:])
    kp, k_idx, cu_k, max_k = _unpad(k, mask)
    vp = v.reshape(-1, *v.shape[2:]).index_select(0, k_idx)
    packed = flash_attention_varlen(qp, kp, vp, cu_q, cu_k, max(max_q, 1), max(max_k, 1), causal=causal,
                                    window_size=window, softmax_scale=scaling)
    out = packed.new_zeros(b * sq, *packed.shape[1:]).index_copy(0, q_idx, packed)
    return out.view(b, sq, *packed.shape[1:]).to(dtype), None


AttentionInterface.register(NAME, pyllmops_attention_forward)
AttentionMaskInterface.register(NAME, pyllmops_mask)
