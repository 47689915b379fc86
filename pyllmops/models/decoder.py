"""A small Llama / Mistral-style decoder on pyllmops' kernels.

Pre-norm blocks: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)); rotary positions; GQA self-attention
through flash_attention_varlen (packed sequences: SFT packing needs no padding), one batched flash_attention
call (a (batch, seqlen) input) or the paged KV cache (generation, see pyllmops.models.generate); SwiGLU MLP
down(silu(gate(x)) * up(x)); optional sliding window. RMSNorm, rotary, SwiGLU and the loss (Decoder.loss:
lm_head + cross-entropy without full logits) are the fused autograd ops of pyllmops.nn.fused.

Module and parameter names are Llama's (embed_tokens, layers.N.self_attn.{q,k,v,o}_proj,
layers.N.mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm, norm, lm_head), so
pyllmops.apply_lora(model, target_modules=[...]) finds the projections by name.
"""
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyllmops.nn import fused
from pyllmops.nn.attention import MultiHeadAttention
from pyllmops.ops._common import check_int, check_tensor
from pyllmops.ops.attention import flash_attention, flash_attention_varlen
from pyllmops.ops.paged import paged_attention


# The Linear layers of every block, by their Llama names (apply_lora's target_modules for "all of them").
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DecoderConfig:
    """Sizes of a Decoder. sliding_window=w: query at position p sees keys p - w .. p (pyllmops'
    window_size=(w, 0); transformers' Mistral sliding_window counts w + 1). head_dim defaults to
    hidden_size // num_heads and must be a multiple of 8."""
    vocab_size: int = 259
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            check_int(name, getattr(self, name), min_value=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                                 f"({self.num_heads}) unless head_dim is given")
            self.head_dim = self.hidden_size // self.num_heads
        check_int("head_dim", self.head_dim, min_value=8)
        if self.head_dim % 8 or self.head_dim > 256:
            raise ValueError(f"head_dim must be a multiple of 8 in [8, 256] (flash attention), got {self.head_dim}")
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window, min_value=1)
        for name in ("rope_base", "rms_norm_eps", "initializer_range"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")

    def to_dict(self):
        return asdict(self)


def _activation_dtype(x):
    """The autocast dtype when autocast is on for x's device (pyllmops' kernels are custom ops, which
    autocast does not cast: the model casts the normalized activations that feed them), else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype (the autocast
    dtype under autocast; the residual stream itself stays in x's dtype)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return fused.rms_norm(x, self.weight, self.eps, _activation_dtype(x))


class Packed:
    """Where a forward pass's tokens are: packed sequences (flash_attention_varlen), or new tokens of
    sequences in a PagedKVCache (paged_attention). Built by Decoder / generate, shared by all layers."""

    def __init__(self, positions, cu_seqlens, max_seqlen, cache=None, slots=None, block_tables=None, seq_lens=None,
                 decode=False, batch=None):
        self.positions, self.cu_seqlens, self.max_seqlen = positions, cu_seqlens, max_seqlen
        # batch: None, or the number of sequences when all of them are max_seqlen long (a (batch, seqlen) input):
        # attention then takes (batch, seqlen, heads, head_dim) views of the packed tokens (flash_attention, one
        # call, no per-sequence split) instead of the varlen layout.
        self.batch = batch
        self.cache, self.slots, self.block_tables, self.seq_lens, self.decode = (cache, slots, block_tables,
                                                                                 seq_lens, decode)
        self._rotary = {}

    def rotary_tables(self, head_dim, base):
        """(cos, sin) half-width tables of these positions (pyllmops.nn.fused.rotary_tables), built once per
        forward pass and shared by every layer."""
        key = (head_dim, base)
        if key not in self._rotary:
            self._rotary[key] = fused.rotary_tables(self.positions, head_dim, base)
        return self._rotary[key]


def _compute_dtype(t):
    """CUDA kernels take fp16/bf16: under autocast (or for fp32 activations) attention runs in bf16."""
    if t.is_cuda and t.dtype == torch.float32:
        return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
    return t.dtype


class DecoderAttention(MultiHeadAttention):
    """MultiHeadAttention's projections and rotary table, run on packed tokens (varlen) or the paged cache."""

    def __init__(self, config, layer_idx):
        super().__init__(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, causal=True,
                         window=config.sliding_window, rope_base=config.rope_base)
        self.layer_idx = layer_idx

    def forward(self, x, ctx):  # x: (tokens, hidden)
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = ctx.rotary_tables(self.head_dim, self.rotary.base)
        q, k = fused.rotary(q, cos, sin), fused.rotary(k, cos, sin)
        out_dtype, dt = q.dtype, _compute_dtype(q)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if ctx.cache is None and ctx.batch is not None:
            b, s = ctx.batch, ctx.max_seqlen
            out = flash_attention(q.view(b, s, *q.shape[1:]), k.view(b, s, *k.shape[1:]), v.view(b, s, *v.shape[1:]),
                                  causal=True, window_size=self.window_size())
        elif ctx.cache is None:
            out = flash_attention_varlen(q, k, v, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                                         causal=True, window_size=self.window_size())
        else:
            cache = ctx.cache
            cache.write(self.layer_idx, k.to(cache.dtype), v.to(cache.dtype), ctx.slots)
            out = paged_attention(q.to(cache.dtype), cache.key_cache[self.layer_idx], cache.value_cache[self.layer_idx],
                                  ctx.block_tables, ctx.seq_lens, window_left=self.window_size()[0],
                                  cu_seqlens_q=None if ctx.decode else ctx.cu_seqlens,
                                  max_seqlen_q=None if ctx.decode else ctx.max_seqlen)
        return self.o_proj(out.to(out_dtype).reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(fused.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, ctx):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


def cu_seqlens_from_lengths(lengths, device):
    """int32 (n + 1,) offsets [0, l0, l0 + l1, ...] on `device`; lengths: a sequence or a tensor."""
    lens = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=device)
    cu[1:] = torch.cumsum(lens, 0)
    return cu.to(torch.int32)


def positions_from_lengths(lengths, device, starts=None):
    """Per-token positions of packed sequences: start_b + 0 .. start_b + l_b - 1."""
    starts = [0] * len(lengths) if starts is None else starts
    return torch.cat([torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(starts, lengths)]
                     or [torch.zeros(0, dtype=torch.int64)]).to(device)


class Decoder(nn.Module):
    """Llama / Mistral-style causal LM (see the module docstring).

    forward(input_ids, cu_seqlens=None) -> logits float32:
      - input_ids (batch, seqlen): every row one full sequence -> (batch, seqlen, vocab);
      - input_ids (total,) with cu_seqlens int32 (n + 1,): n packed sequences -> (total, vocab).
    gradient_checkpointing (attribute, default False): recompute each layer in the backward pass.

    Example:
        >>> model = Decoder(DecoderConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
        >>> logits = model(torch.randint(0, 259, (2, 16)))
        >>> pyllmops.apply_lora(model, r=8, target_modules=["q_proj", "v_proj"], quantize="nf4")
    """

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if config is None:
            config = DecoderConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a DecoderConfig or keyword sizes, not both (got {sorted(kwargs)})")
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def hidden(self, input_ids, ctx):
        """The final normed hidden states (total, hidden) of packed tokens input_ids (total,) laid out as ctx says."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.norm(x)

    def run(self, input_ids, ctx):
        """Logits of packed tokens input_ids (total,) laid out as ctx says."""
        return self.lm_head(self.hidden(input_ids, ctx)).float()

    def _check_ids(self, input_ids):
        """Token ids in [0, vocab_size): the embedding would raise a bare IndexError (on CUDA, a device assert)."""
        if input_ids.numel() and input_ids.device.type != "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            vocab = self.config.vocab_size
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                pos = tuple(int(i) for i in (input_ids == bad).nonzero()[0])
                raise IndexError(f"input_ids holds token id {bad} at index {pos}, outside the vocabulary "
                                 f"[0, {vocab}) (vocab_size={vocab})")

    def _layout(self, input_ids, cu_seqlens):
        """-> (packed int64 ids (total,), Packed ctx, output shape prefix) after checking the arguments."""
        check_tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32))
        self._check_ids(input_ids)
        if input_ids.dim() == 2:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens is for packed 1-D input_ids; got 2-D input_ids "
                                 f"{tuple(input_ids.shape)} and cu_seqlens")
            b, s = input_ids.shape
            if b < 1 or s < 1:
                raise ValueError(f"input_ids must be (batch >= 1, seqlen >= 1), got {tuple(input_ids.shape)}")
            lengths = [s] * b
            ctx = Packed(positions_from_lengths(lengths, input_ids.device), cu_seqlens_from_lengths(lengths,
                         input_ids.device), s, batch=b)
            return input_ids.reshape(-1).long(), ctx, (b, s)
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be (batch, seqlen) or packed (total,), got {tuple(input_ids.shape)}")
        if cu_seqlens is None:
            raise ValueError("packed (total,) input_ids need cu_seqlens (int32, n + 1 offsets)")
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), dim=1, device=input_ids.device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if cu_seqlens[0].item() != 0 or min(lengths, default=0) < 0 or sum(lengths) != input_ids.shape[0]:
            raise ValueError(f"cu_seqlens must rise from 0 to input_ids' {input_ids.shape[0]} tokens, got "
                             f"{cu_seqlens.tolist()[:8]}")
        ctx = Packed(positions_from_lengths(lengths, input_ids.device), cu_seqlens, max(lengths, default=1) or 1)
        return input_ids.long(), ctx, (input_ids.shape[0],)

    def forward(self, input_ids, cu_seqlens=None):
        ids, ctx, prefix = self._layout(input_ids, cu_seqlens)
        logits = self.run(ids, ctx)
        return logits.view(*prefix, -1) if len(prefix) == 2 else logits

    def loss(self, input_ids, labels=None, cu_seqlens=None):
        """Causal-LM loss, as transformers' model(input_ids, labels=labels).loss: token t of each sequence
        predicts labels[t + 1] of that sequence (the last token of a sequence predicts nothing); targets equal
        to -100 do not count; the mean over the counted tokens (0 with zero gradients if none counts).
        labels: input_ids' shape, default input_ids. Computed with pyllmops.nn.fused.linear_cross_entropy:
        only the counted tokens' hidden states reach the lm_head, and the (tokens, vocab) logits are never
        materialized (float32 loss, as forward's float32 logits would give)."""
        ids, ctx, _ = self._layout(input_ids, cu_seqlens)
        if labels is None:
            labels = input_ids
        check_tensor("labels", labels, dtypes=(torch.int64, torch.int32), device=input_ids.device)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        lab = labels.reshape(-1).long()
        targets = torch.full_like(lab, fused.IGNORE)
        targets[:-1] = lab[1:]
        targets[ctx.cu_seqlens[1:].long() - 1] = fused.IGNORE  # each sequence's last token: no next token
        return self._target_loss(ids, ctx, targets)

    def target_loss(self, input_ids, targets, cu_seqlens=None):
        """Mean cross-entropy of packed tokens input_ids (total,) against targets (total,) that are already
        aligned (targets[t] is what token t predicts, -100 where nothing counts), as
        sft_loss(self(input_ids, cu_seqlens), targets) computes it, through the chunked loss of `loss`."""
        ids, ctx, _ = self._layout(input_ids, cu_seqlens)
        check_tensor("targets", targets, dtypes=(torch.int64,), dim=1, device=input_ids.device)
        if targets.shape[0] != ids.shape[0]:
            raise ValueError(f"targets has {targets.shape[0]} entries, expected one per token ({ids.shape[0]})")
        return self._target_loss(ids, ctx, targets)

    def _target_loss(self, ids, ctx, targets):
        counted = (targets != fused.IGNORE).nonzero().squeeze(1)
        h = self.hidden(ids, ctx)
        if counted.numel() < 0.9 * h.shape[0]:  # many uncounted rows (prompts): they skip the lm_head GEMMs
            h, targets = h.index_select(0, counted), targets.index_select(0, counted)
        if type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:  # e.g. an adapted lm_head
            from pyllmops.train.losses import sft_loss

            return sft_loss(self.lm_head(h).float(), targets)
        w = self.lm_head.weight
        return fused.linear_cross_entropy(h.to(w.dtype), w, targets)

    def num_parameters(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def merge_adapters(model):
    """Folds every adapter into a dense nn.Linear, in place (peft's merge_and_unload): W' = dequantized
    base + scaling * B.A for LoRALinear (dense or NF4 base), the merged INT weight for QALoRALinear.
    The new layers are frozen and have the base's dtype (float32 for quantized bases). Used between
    SFT and DPO: the merged SFT model becomes the base, and its own reference once re-adapted.
    Returns the model."""
    from pyllmops.nn.lora import LoRALinear, QALoRALinear
    from pyllmops.ops.lora import dequantize_int

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            base = mod.base_layer
            if mod.quantized:
                w = base.dequantized_weight(torch.float32)
            else:
                w = base.weight.detach().float()
            w = w + (0 if mod.merged else mod.delta_weight())
            dtype = torch.float32 if mod.quantized else base.weight.dtype
        elif isinstance(mod, QALoRALinear):
            b = mod.base_layer
            w = dequantize_int(b.qweight, b.scales, mod.merged_zeros(), mod.bits, mod.group_size)
            base, dtype = b, torch.float32
        else:
            continue
        dense = nn.Linear(mod.in_features, mod.out_features, bias=base.bias is not None, dtype=dtype, device=w.device)
        with torch.no_grad():
            dense.weight.copy_(w.to(dtype))
            if base.bias is not None:
                dense.bias.copy_(base.bias.detach().to(dtype))
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model
