"""Rotary position embedding (RoPE, Su et al. 2021) in the Llama / Mistral convention ("rotate half":
dims [0, d/2) pair with [d/2, d)), for attention modules and models to share."""
import torch


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x (..., seqlen, heads, head_dim) with cos/sin (seqlen, head_dim) or broadcastable
    (batch, seqlen, 1, head_dim): x * cos + rotate_half(x) * sin, computed in float32."""
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for positions: inv_freq[i] = base ** (-2 i / head_dim), angle = position * inv_freq.

    forward(positions) with positions int (seqlen,) or (batch, seqlen) -> (cos, sin) float32 of shape
    (seqlen, head_dim) or (batch, seqlen, 1, head_dim), ready for apply_rotary on (batch, seqlen, heads, d).
    """

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        if head_dim % 2 != 0 or head_dim < 2:
            raise ValueError(f"head_dim must be even and >= 2 for rotary embedding, got {head_dim}")
        if not base > 0:
            raise ValueError(f"base must be positive, got {base}")
        self.head_dim, self.base = head_dim, float(base)

    def inv_freq(self, device):
        # Computed in float32 on each call (head_dim / 2 values), not kept as a buffer: a buffer would
        # follow module.to(torch.bfloat16) and bf16 frequencies put angles at position 1000 off by ~0.5 rad.
        return 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                    / self.head_dim))

    def forward(self, positions):
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq(positions.device)
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        return cos, sin
