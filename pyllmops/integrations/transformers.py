"""transformers integration: importing this module registers the attention implementation "pyllmops".

    import pyllmops.integrations.transformers  # noqa: F401
    model.set_attn_implementation("pyllmops")   # or from_pretrained(..., attn_implementation="pyllmops")

Attention then runs on pyllmops.flash_attention (pyllmops.flash_attention_varlen when a padding mask
is present, a static cache has empty slots, or rows pack several sequences: cu_seq_lens_q/k kwargs,
or position_ids that jump with no mask and no cache, exactly when transformers itself separates packed
sequences), through transformers' registration points, no patching: AttentionInterface (the
attention function) and masking_utils.AttentionMaskInterface (the mask function, which hands the
attention a 2-D padding mask, or None when nothing is padded, instead of a 4-D mask).

Semantics: causal unless the module says otherwise (module.is_causal / is_causal=); GQA natively (no
repeat of K/V); a model's sliding_window W as transformers defines it (key j visible from query i iff
i - j < W, i.e. pyllmops window_size=(W - 1, 0)); with a KV cache the queries are the last positions
(bottom-right alignment). Under torch.autocast q/k/v run in the autocast dtype, as sdpa. Logit
soft-capping (Gemma 2) is passed to flash_attention(softcap=) when this pyllmops has it, else refused.
Not supported (ValueError): attention dropout in training, 4-D custom masks. On CUDA the kernels take
fp16/bf16: float32 inputs (without autocast) are computed in bfloat16. torch.compile(fullgraph=True)
traces an unpadded forward without graph breaks (dynamic=True too); see docs/integrations.md.
"""
import inspect

import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from pyllmops.models.decoder import cu_seqlens_from_lengths
from pyllmops.ops._common import softmax_scale_or_default
from pyllmops.ops.attention import flash_attention, flash_attention_varlen

NAME = "pyllmops"
# Gemma 2's logit soft-capping passes through once pyllmops.flash_attention takes softcap=.
_HAS_SOFTCAP = "softcap" in inspect.signature(flash_attention).parameters


def pyllmops_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  **kwargs):
    """Mask function for AttentionMaskInterface: a 2-D (batch, filled) bool mask of the key columns that
    hold tokens and are not padding, or None when all kv_length columns do (the kernel builds causal /
    window masks itself).

    `filled` = q_offset + q_length - kv_offset: a static cache's keys past the last query are empty
    slots and must not be attended to, so the mask is then shorter than kv_length and the attention
    function trims K/V to it. Column j is absolute position kv_offset + j of the 2-D attention_mask."""
    filled = max(0, min(kv_length, q_offset + q_length - kv_offset))
    if attention_mask is None:
        if filled == kv_length:
            return None
        return torch.ones(batch_size, filled, dtype=torch.bool)
    cols = kv_offset + torch.arange(filled, device=attention_mask.device)
    mask = torch.zeros(attention_mask.shape[0], filled, dtype=torch.bool, device=attention_mask.device)
    inside = cols < attention_mask.shape[1]
    mask[:, inside] = attention_mask[:, cols[inside]].bool()
    return None if (filled == kv_length and bool(mask.all())) else mask


def _unpad(x, mask):
    """x (b, s, h, d), mask (b, s) bool -> packed (total, h, d), row indices, int32 cu_seqlens, max length."""
    b, s = mask.shape
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    lens = mask.sum(-1)
    cu = cu_seqlens_from_lengths(lens, x.device)
    return x.reshape(b * s, *x.shape[2:]).index_select(0, idx), idx, cu, int(lens.max().item()) if b else 0


def _softcap_kwargs(softcap):
    """{"softcap": value} for flash_attention when a model soft-caps its logits (Gemma 2), else {}."""
    if not softcap:
        return {}
    if not _HAS_SOFTCAP:
        raise ValueError(f"logit soft-capping (softcap={softcap}) needs pyllmops.flash_attention(softcap=...), which "
                         f"this build of pyllmops does not have; use attn_implementation='eager' for this model")
    return {"softcap": float(softcap)}


def _compute_dtype(query, key, value):
    """The dtype attention runs in, as torch's sdpa decides it: under torch.autocast the autocast dtype
    (rotary embeddings leave q/k in float32 while v comes from an autocast linear in bf16/fp16); else
    the inputs' dtype, which must agree. CUDA kernels take fp16/bf16 only: float32 runs in bfloat16."""
    dev = query.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = query.dtype
    if dev == "cuda" and dtype == torch.float32:
        return torch.bfloat16
    return dtype


def pyllmops_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                               sliding_window=None, softcap=None, **kwargs):
    """AttentionInterface function: query (b, heads_q, sq, d), key/value (b, heads_kv, sk, d) ->
    ((b, sq, heads_q, d), None). The output has the compute dtype (see _compute_dtype): the autocast
    dtype under torch.autocast, as sdpa's, else the query's."""
    if dropout and module.training:
        raise ValueError(f"attention dropout is not supported by the pyllmops attention implementation, got "
                         f"dropout={dropout}")
    extra = _softcap_kwargs(softcap)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"the pyllmops attention implementation takes a 2-D padding mask (from its mask function), "
                         f"got a {attention_mask.dim()}-D attention_mask of shape {tuple(attention_mask.shape)}")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    left = -1 if sliding_window is None else int(sliding_window) - 1
    window = (left, 0 if causal else left)
    out_dtype = query.dtype
    dtype = _compute_dtype(query, key, value)
    if not (query.is_cuda and query.dtype == torch.float32):
        out_dtype = dtype  # autocast: sdpa returns the autocast dtype
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))  # (b, s, h, d) views when no cast
    b, sq = q.shape[:2]
    if attention_mask is None:
        cu = _packed_boundaries(kwargs, b, sq, k.shape[1], q.device)
        if cu is None:
            out = flash_attention(q, k, v, causal=causal, window_size=window, softmax_scale=scaling, **extra)
            return out.to(out_dtype), None
        # padding-free packed batch (rows holding several sequences): attention stays inside each
        cu_q, cu_k, max_q, max_k = cu
        flat = (lambda t: t.reshape(-1, *t.shape[2:]))
        if torch.compiler.is_compiling():
            # flash_attention_varlen reads CPU offsets on the host to validate them (a graph break); these
            # offsets are built valid, and the kernels check them again (CPU: raise; CUDA: error word).
            out, _ = torch.ops.pyllmops.flash_attn_fwd(
                flat(q), flat(k), flat(v), cu_q, cu_k, max_q, max_k,
                softmax_scale_or_default(scaling, q.shape[-1]), float(extra.get("softcap", 0.0)), window[0],
                window[1], False, False)
        else:
            out = flash_attention_varlen(flat(q), flat(k), flat(v), cu_q, cu_k, max_q, max_k, causal=causal,
                                         window_size=window, softmax_scale=scaling, **extra)
        return out.view(b, sq, *out.shape[1:]).to(out_dtype), None
    mask = attention_mask.bool().to(q.device)
    if mask.shape[1] < k.shape[1]:  # a static cache: its empty tail slots are not keys
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    if left >= 0 and sq == 1:
        # The kernel applies the window to packed rows; padding inside a row (generation after right
        # padding) would bring keys from outside the window nearer. One query (decode) sits at the last
        # column, so the window is exactly "column >= columns - window" and goes into the mask instead.
        mask = mask.clone()
        mask[:, :max(0, mask.shape[1] - (left + 1))] = False
    qp, q_idx, cu_q, max_q = _unpad(q, mask[:, -sq:])
    kp, k_idx, cu_k, max_k = _unpad(k, mask)
    vp = v.reshape(-1, *v.shape[2:]).index_select(0, k_idx)
    packed = flash_attention_varlen(qp, kp, vp, cu_q, cu_k, max(max_q, 1), max(max_k, 1), causal=causal,
                                    window_size=window, softmax_scale=scaling, **extra)
    out = packed.new_zeros(b * sq, *packed.shape[1:]).index_copy(0, q_idx, packed)
    return out.view(b, sq, *packed.shape[1:]).to(out_dtype), None


def _packed_boundaries(kwargs, b, sq, sk, device):
    """(cu_q, cu_k, max_q, max_k) over the flattened (b * s) rows when the batch packs several sequences
    per row without padding, as transformers itself decides: from cu_seq_lens_q/k kwargs (e.g.
    DataCollatorWithFlattening), or, with no attention mask and no KV cache (use_cache=False, sq == sk),
    from position_ids that do not advance by 1 (a new sequence starts). None otherwise.

    Under torch.compile the position_ids path has no data-dependent control flow or shapes (no graph
    break): every one of the b * sq rows may start a sequence, so cu_seqlens has b * sq + 1 entries, the
    starts sorted first and the rest equal to b * sq (empty sequences), and max_seqlen is sq (a sequence
    never spans two rows). Eagerly, only the real starts are kept (a plain forward when there are none)."""
    if kwargs.get("cu_seq_lens_q") is not None:
        cu_q = kwargs["cu_seq_lens_q"].to(device, torch.int32)
        cu_k = kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"]).to(device, torch.int32)
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if max_q is None or max_k is None:
            if torch.compiler.is_compiling():  # no host read of the offsets: a row bounds every sequence
                max_q, max_k = b * sq, b * sk
            else:
                max_q = int((cu_q[1:] - cu_q[:-1]).max().item()) if max_q is None else max_q
                max_k = int((cu_k[1:] - cu_k[:-1]).max().item()) if max_k is None else max_k
        return cu_q, cu_k, int(max_q), int(max_k)
    pos = kwargs.get("position_ids")
    if pos is None or kwargs.get("use_cache", True) is not False or sq != sk or sq < 2:
        return None
    pos = pos.to(device).expand(b, -1) if pos.shape[0] != b else pos.to(device)
    jumps = pos[:, 1:] - pos[:, :-1] != 1
    starts = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), jumps], dim=1).reshape(-1)
    n = b * sq
    if torch.compiler.is_compiling():
        rows = torch.arange(n, device=device)
        first = torch.where(starts, rows, torch.full_like(rows, n)).sort().values
        cu = torch.cat([first, first.new_full((1,), n)]).to(torch.int32)
        return cu, cu, sq, sq
    if not bool(jumps.any()):
        return None
    cu = torch.cat([starts.nonzero().flatten(), torch.tensor([n], device=device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max().item())
    return cu, cu, longest, longest


AttentionInterface.register(NAME, pyllmops_attention_forward)
AttentionMaskInterface.register(NAME, pyllmops_mask)
