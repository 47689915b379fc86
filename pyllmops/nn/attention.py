"""MultiHeadAttention: a decoder block's self-attention on pyllmops' flash attention kernels."""
import torch

from pyllmops.nn.rotary import RotaryEmbedding, apply_rotary
from pyllmops.ops._common import check_bool, check_int
from pyllmops.ops.attention import _softcap, flash_attention


class MultiHeadAttention(torch.nn.Module):
    """Self-attention with q/k/v/o projections (Llama's names q_proj, k_proj, v_proj, o_proj), GQA,
    optional rotary embedding and sliding window.

    Args:
        hidden_size: model width.
        num_heads: query heads; num_kv_heads: key/value heads (default num_heads; a divisor of it: GQA).
        head_dim: default hidden_size // num_heads (a multiple of 8 up to 256).
        causal: decoder (causal) attention.
        window: sliding window: query i sees keys i - window .. i (window_size=(window, 0) when causal,
            (window, window) otherwise), or None for full attention.
        rope_base: rotary base (Llama: 10000, Llama 3: 500000), or None for no rotary embedding.
        bias: bias on the q/k/v projections (o_proj has none), as Qwen2.
        softcap: attention logit softcap (Gemma 2: 50.0), 0.0 = off; see pyllmops.flash_attention.

    forward(x (batch, seqlen, hidden), position_ids=None (batch, seqlen) or (seqlen,)) -> (batch, seqlen, hidden).

    Example:
        >>> attn = pyllmops.nn.MultiHeadAttention(512, num_heads=8, num_kv_heads=2, window=256)
        >>> y = attn(torch.randn(2, 1000, 512))
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, *, causal=True, window=None,
                 rope_base=10000.0, bias=False, softcap=0.0, device=None, dtype=None):
        super().__init__()
        check_int("hidden_size", hidden_size, min_value=1)
        check_int("num_heads", num_heads, min_value=1)  # before hidden_size // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check_int(name, val, min_value=1)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_bool("causal", causal)
        if window is not None:
            check_int("window", window, min_value=0)
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, \
            head_dim
        self.causal, self.window, self.softcap = causal, window, _softcap(softcap)
        kw = dict(device=device, dtype=dtype)
        self.q_proj = torch.nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **kw)
        self.k_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = torch.nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = torch.nn.Linear(num_heads * head_dim, hidden_size, bias=False, **kw)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope_base is not None else None

    def window_size(self):
        left = -1 if self.window is None else self.window
        right = 0 if self.causal else (-1 if self.window is None else self.window)
        return left, right

    def forward(self, x, position_ids=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (batch, seqlen, hidden_size), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape (batch, seqlen, hidden_size={self.hidden_size}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.rotary is not None:
            pos = torch.arange(s, device=x.device) if position_ids is None else position_ids
            cos, sin = self.rotary(pos)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = flash_attention(q, k, v, causal=self.causal, window_size=self.window_size(), softcap=self.softcap)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
