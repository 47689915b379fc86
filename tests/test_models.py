"""pyllmops.models: the decoder against a float64 formula, packing, LoRA targets, generation on the paged
cache against full recomputation, sampling."""
import math

import pytest
import torch

import pyllmops
from pyllmops.models import PROJECTIONS as TARGETS, Decoder, DecoderConfig, generate, generate_recompute, sample_next
from pyllmops.reference.attention import attention as ref_attention

from conftest import assert_close
from train_fixtures import one_thread  # noqa: F401  (autouse)



def tiny(window=None, init=0.2, **kw):
    cfg = dict(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
               sliding_window=window, initializer_range=init)
    cfg.update(kw)
    return Decoder(DecoderConfig(**cfg))


def reference_logits(model, ids):
    """The decoder written out in float64: RMSNorm, RoPE (rotate-half), causal GQA attention with the
    window (pyllmops.reference.attention), SwiGLU. ids (seqlen,) -> (seqlen, vocab)."""
    cfg = model.config
    d = cfg.head_dim
    w = {k: v.detach().double() for k, v in model.state_dict().items()}

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

    s = ids.shape[0]
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rope(x):
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["embed_tokens.weight"][ids]
    window = (-1 if cfg.sliding_window is None else cfg.sliding_window, 0)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(s, cfg.num_heads, d))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(s, cfg.num_kv_heads, d))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(s, cfg.num_kv_heads, d)
        o, _ = ref_attention(q[None], k[None], v[None], causal=True, window_size=window)
        x = x + o[0].reshape(s, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("window", [None, 5])
def test_decoder_matches_float64_formula(window):
    model = tiny(window)
    ids = torch.randint(0, 259, (37,))
    out = model(ids[None])[0]
    assert out.dtype == torch.float32
    assert_close(out, reference_logits(model, ids), 1e-4, "decoder logits")


def test_packed_sequences_do_not_see_each_other():
    model = tiny(window=6)
    seqs = [torch.randint(0, 259, (n,)) for n in (1, 17, 9, 30)]
    lengths = torch.tensor([0] + [len(s) for s in seqs])
    cu = torch.cumsum(lengths, 0).to(torch.int32)
    packed = model(torch.cat(seqs), cu)
    for b, s in enumerate(seqs):
        alone = model(s[None])[0]
        assert_close(packed[cu[b]:cu[b + 1]], alone, 1e-5, f"sequence {b}")


def test_activation_checkpointing_same_gradients():
    model = tiny()
    pyllmops.apply_lora(model, r=4, target_modules=TARGETS)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 259, (2, 23))
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert_close(b, a, 1e-6, "checkpointed gradient")


def test_apply_lora_finds_llama_names():
    model = tiny(num_layers=3)
    pyllmops.apply_lora(model, r=4, target_modules=TARGETS, quantize="nf4")
    adapters = [n for n, m in model.named_modules() if isinstance(m, pyllmops.nn.LoRALinear)]
    assert len(adapters) == 3 * len(TARGETS)
    assert all(n.endswith("lora_A") or n.endswith("lora_B") for n, p in model.named_parameters() if p.requires_grad)
    assert isinstance(model.layers[2].mlp.down_proj.base_layer, pyllmops.nn.NF4Linear)


def _adapted(window=None, quantize="nf4"):
    model = tiny(window)
    pyllmops.apply_lora(model, r=8, target_modules=TARGETS, quantize=quantize, group_size=32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.2)  # non-zero adapters, so generation depends on them
    return model


@pytest.mark.parametrize("window", [None, 7])
def test_greedy_generation_equals_full_recomputation(window):
    model = _adapted(window)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (1, 5, 21, 12)]
    got = generate(model, prompts, max_new_tokens=24, block_size=8)
    ref = generate_recompute(model, prompts, max_new_tokens=24)
    assert got == ref
    assert all(len(g) == 24 for g in got)


def test_stop_tokens_end_each_sequence():
    model = _adapted()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 8)]
    free = generate(model, prompts, max_new_tokens=12)
    stop = free[1][4]  # a token sequence 1 emits at step 5
    got = generate(model, prompts, max_new_tokens=12, stop_tokens=[stop])
    for g, f in zip(got, free):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]
    assert got[1][-1] == stop and len(got[1]) <= 5


def test_sampling_reproducible_and_nucleus():
    model = _adapted()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    a = generate(model, prompts, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompts, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b
    # a nucleus so small it holds only the most likely token is greedy decoding
    c = generate(model, prompts, 10, temperature=0.7, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert c == generate(model, prompts, 10)


def test_sample_next_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    counts = torch.bincount(draws, minlength=4).double() / draws.numel()
    # nucleus {0, 1} (0.5 < 0.7 <= 0.8), renormalized: 0.625, 0.375
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0].item() - 0.625) < 0.04
    assert torch.equal(sample_next(logits[:3], temperature=0.0), torch.zeros(3, dtype=torch.long))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        DecoderConfig(hidden_size=60, num_heads=4)
    with pytest.raises(ValueError, match="sliding_window"):
        DecoderConfig(sliding_window=0)
    model = tiny()
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(5, dtype=torch.long), torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="prompts\\[1\\] is empty"):
        generate(model, [[1], []])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], temperature=-1)
    with pytest.raises(ValueError, match=r"prompts\[0\] must hold ints in \[0, 259\)"):
        generate(model, [[300]])
    assert math.isfinite(model(torch.zeros(1, 1, dtype=torch.long)).sum().item())


@pytest.mark.parametrize("quantize", [None, "nf4", "int4"])
def test_merge_adapters_keeps_the_function(quantize):
    from pyllmops.models import merge_adapters

    model = _adapted(quantize=quantize)
    ids = torch.randint(0, 259, (2, 19))
    before = model(ids)
    merge_adapters(model)
    assert not any(isinstance(m, (pyllmops.nn.LoRALinear, pyllmops.nn.QALoRALinear)) for m in model.modules())
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert_close(model(ids), before, 1e-5, "logits after merge")


def test_rotary_survives_a_bf16_cast():
    """The frequencies stay float32 when the module is cast: bf16 frequencies are ~0.5 rad off at 1000."""
    from pyllmops.nn.rotary import RotaryEmbedding

    rot = RotaryEmbedding(64)
    pos = torch.tensor([1, 1000, 4000])
    want = rot(pos)
    got = rot.to(torch.bfloat16)(pos)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)
