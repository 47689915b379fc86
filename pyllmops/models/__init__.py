"""A small Llama / Mistral-style decoder on pyllmops' kernels, and batched generation on the paged KV cache."""
from pyllmops.models.decoder import Decoder, DecoderConfig, RMSNorm
from pyllmops.models.generate import generate, generate_recompute, sample_next

__all__ = ["Decoder", "DecoderConfig", "RMSNorm", "generate", "generate_recompute", "sample_next"]
