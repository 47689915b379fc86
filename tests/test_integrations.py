"""pyllmops.integrations.transformers on tiny randomly initialized Llama and Mistral models (no download):
logits, gradients and cached generation match transformers' eager attention; apply_lora on a transformers
model matches peft with the same adapter weights."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyllmops  # noqa: E402
import pyllmops.integrations.transformers  # noqa: E402,F401  (registers "pyllmops")

from conftest import assert_close  # noqa: E402
from train_fixtures import one_thread  # noqa: F401,E402  (autouse)

VOCAB = 97


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the registered attention function (so a test knows our kernels ran)."""
    from transformers.modeling_utils import AttentionInterface

    fn, count = AttentionInterface._global_mapping["pyllmops"], [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "pyllmops", counting)
    return count


def llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def mistral(window):
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                     sliding_window=window)
    return transformers.MistralForCausalLM(cfg).eval()


def logits(model, impl, ids, mask=None):
    model.set_attn_implementation(impl)
    return model(ids, attention_mask=mask).logits


def test_registered():
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    assert "pyllmops" in AttentionInterface._global_mapping
    assert "pyllmops" in AttentionMaskInterface._global_mapping
    model = llama()
    model.set_attn_implementation("pyllmops")
    assert model.config._attn_implementation == "pyllmops"


@pytest.mark.parametrize("seqlen", [1, 17, 40])
def test_llama_gqa_logits_match_eager(seqlen, calls):
    model = llama()
    ids = torch.randint(0, VOCAB, (3, seqlen))
    assert_close(logits(model, "pyllmops", ids), logits(model, "eager", ids), 1e-5, "llama logits")
    assert calls[0] == 2  # one call per layer


def test_padding_mask_matches_eager():
    model = llama()
    ids = torch.randint(0, VOCAB, (3, 21))
    mask = torch.ones(3, 21, dtype=torch.long)
    mask[0, :6] = 0    # left padding
    mask[2, 15:] = 0   # right padding
    ours, ref = logits(model, "pyllmops", ids, mask), logits(model, "eager", ids, mask)
    keep = mask.bool()
    assert_close(ours[keep], ref[keep], 1e-5, "logits of real tokens")


def test_mistral_sliding_window_logits_match_eager():
    model = mistral(window=5)
    ids = torch.randint(0, VOCAB, (2, 33))
    ours, ref = logits(model, "pyllmops", ids), logits(model, "eager", ids)
    assert_close(ours, ref, 1e-5, "mistral logits")
    model.config.sliding_window = None  # the window matters at this length: without it the logits differ
    assert (logits(model, "eager", ids) - ref).abs().max() > 1e-3


def test_gradients_match_eager():
    model = llama()
    ids = torch.randint(0, VOCAB, (2, 13))
    grads = {}
    for impl in ("eager", "pyllmops"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        model(ids, labels=ids).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, g in grads["eager"].items():
        assert_close(grads["pyllmops"][n], g, 1e-4, n)


def test_cached_generation_matches_eager(calls):
    model = mistral(window=6)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = {}
    for impl in ("eager", "pyllmops"):
        model.set_attn_implementation(impl)
        # min_new_tokens: for some seeds the random model's first token is the EOS token (2) for both rows
        # (PYLLMOPS_TEST_SEED=437084051), which ended generation after the prefill
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["pyllmops"], out["eager"])
    assert calls[0] == 2 * 12  # prefill + 11 decode steps, 2 layers


def test_apply_lora_on_transformers_model_matches_peft():
    peft = pytest.importorskip("peft")
    base = llama()
    ref = copy.deepcopy(base)
    targets = ["q_proj", "v_proj", "down_proj"]
    pyllmops.apply_lora(base, r=4, alpha=8, target_modules=targets)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.1)
    n_adapters = sum(isinstance(m, pyllmops.nn.LoRALinear) for m in base.modules())
    assert n_adapters == 2 * len(targets)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    peft.set_peft_model_state_dict(pm, pyllmops.nn.adapter_state_dict(base))
    ids = torch.randint(0, VOCAB, (2, 15))
    pm.base_model.model.set_attn_implementation("eager")
    ours = logits(base, "pyllmops", ids)
    assert_close(ours, pm(input_ids=ids).logits, 1e-5, "LoRA logits vs peft")
    # only adapters train, and they get gradients through our attention
    base(ids, labels=ids).loss.backward()
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in base.parameters() if p.requires_grad)


def test_unsupported_arguments_are_rejected():
    from pyllmops.integrations.transformers import pyllmops_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 4, 8)
    module.train()
    with pytest.raises(ValueError, match="dropout=0.1"):
        pyllmops_attention_forward(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="4-D attention_mask"):
        pyllmops_attention_forward(module, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("make", [llama, lambda: mistral(6)], ids=["llama", "mistral-window6"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_rows_match_eager(make, use_cache, calls):
    """Rows packing two sequences (position_ids restart, no mask): with no cache transformers attends within
    each sequence, with a cache over the whole row; ours must do the same in both cases."""
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, VOCAB, (2, 20))
    pos = torch.cat([torch.arange(8), torch.arange(12)])[None].expand(2, -1)
    out = {}
    for impl in ("eager", "pyllmops"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model(ids, position_ids=pos, use_cache=use_cache).logits
    assert calls[0] > 0
    assert_close(out["pyllmops"], out["eager"].double(), 1e-5, "packed logits")
    if not use_cache:  # and the second sequence equals itself run alone
        model.set_attn_implementation("eager")
        with torch.no_grad():
            alone = model(ids[:, 8:], use_cache=False).logits
        assert_close(out["pyllmops"][:, 8:], alone.double(), 1e-5, "second packed sequence vs alone")


@pytest.mark.parametrize("make", [llama, lambda: mistral(6)], ids=["llama", "mistral-window6"])
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation_matches_eager(make, padded, calls):
    """A static cache's keys past the current position are empty slots: they must not be attended to."""
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    out = {}
    for impl in ("eager", "pyllmops"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                   cache_implementation="static")
    assert calls[0] > 0
    assert torch.equal(out["pyllmops"], out["eager"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_sdpa(dtype, calls):
    """Under torch.autocast rotary leaves q/k in float32 while v is bf16/fp16: attention runs in the autocast
    dtype, as sdpa does (TRL's default bf16=True trains this way)."""
    torch.manual_seed(0)
    model = llama()
    ids = torch.randint(0, VOCAB, (2, 19))
    out = {}
    for impl in ("sdpa", "pyllmops"):
        model.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=dtype):
            out[impl] = model(ids).logits.float()
    assert calls[0] == 2
    assert_close(out["pyllmops"], out["sdpa"].double(), 2e-2, f"autocast {dtype} logits vs sdpa")
    model.set_attn_implementation("pyllmops")
    with torch.autocast("cpu", dtype=dtype):  # and a training step's backward
        model(ids, labels=ids).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sliding_window_generation_past_the_window(padding, cache, calls):
    """Mistral, window 4, prompts of 11 (left-padded by 3 and 7), 10 new tokens: far past the window, rows
    with fewer real tokens than the window, a static cache's empty slots. (Right-padded prompts are not a
    generation setup: transformers warns and continues from a padding position; their forward is tested
    in test_padding_mask_matches_eager and test_right_padding_decode_window.)"""
    torch.manual_seed(1)
    model = mistral(window=4)
    ids = torch.randint(1, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
        mask[2, :7] = 0
    out = {}
    for impl in ("eager", "pyllmops"):
        model.set_attn_implementation(impl)
        kw = {"cache_implementation": "static"} if cache == "static" else {}
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                   **kw)
    assert calls[0] > 0
    assert torch.equal(out["pyllmops"], out["eager"])


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed-no-cache"])
def test_compile_fullgraph_no_graph_breaks(packed):
    """torch.compile(fullgraph=True) raises on any graph break: an unpadded forward has none (no
    bool(tensor) / .item() / .tolist() of traced values), including rows packing two sequences with
    use_cache=False (fixed-size cu_seqlens under compile); and the compiled logits equal eager's."""
    torch.manual_seed(2)
    model = llama()
    ids = torch.randint(0, VOCAB, (2, 16))
    kw = {}
    if packed:
        kw = {"use_cache": False, "position_ids": torch.cat([torch.arange(5), torch.arange(11)])[None].expand(2, -1)}
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(ids, **kw).logits
    model.set_attn_implementation("pyllmops")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=packed)  # dynamic: a symbolic softmax scale too
    with torch.no_grad():
        got = compiled(ids, **kw).logits
    assert_close(got, ref.double(), 1e-5, "compiled logits vs eager")
    if packed:  # dynamic shapes: another length runs through the same graph
        ids2, kw2 = ids[:, :12], {"use_cache": False, "position_ids": kw["position_ids"][:, :12]}
        model.set_attn_implementation("eager")
        with torch.no_grad():
            ref2 = model(ids2, **kw2).logits
        model.set_attn_implementation("pyllmops")
        with torch.no_grad():
            assert_close(compiled(ids2, **kw2).logits, ref2.double(), 1e-5, "dynamic compile, seqlen 12")


def test_softcap_passes_through_or_is_refused():
    """Gemma 2 soft-caps its attention logits: passed to flash_attention(softcap=) when it has it, else a
    clear error (never silently ignored)."""
    from pyllmops.integrations import transformers as integ

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 4, 8)
    if not integ._HAS_SOFTCAP:
        with pytest.raises(ValueError, match="softcap=30"):
            integ.pyllmops_attention_forward(module, q, q, q, None, softcap=30.0)
        return
    out, _ = integ.pyllmops_attention_forward(module, q, q, q, None, softcap=30.0)
    s = (q @ q.transpose(-1, -2)).double() / 8 ** 0.5
    s = 30.0 * torch.tanh(s / 30.0) + torch.full((4, 4), float("-inf")).triu(1).double()
    ref = (s.softmax(-1) @ q.double()).transpose(1, 2)
    assert_close(out, ref, 1e-5, "softcapped attention")


def test_right_padding_decode_window(calls):
    """A decode step after right padding: the padding sits between the cached real keys and the new token,
    and the sliding window counts positions, not real tokens: the new token's logits equal eager's."""
    torch.manual_seed(4)
    model = mistral(window=4)
    ids = torch.randint(1, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    nxt = torch.randint(1, VOCAB, (2, 1))
    out = {}
    for impl in ("eager", "pyllmops"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            pre = model(ids, attention_mask=mask, use_cache=True)
            full = torch.cat([mask, torch.ones_like(nxt)], 1)
            out[impl] = model(nxt, attention_mask=full, past_key_values=pre.past_key_values,
                              position_ids=torch.full((2, 1), 10)).logits
    assert calls[0] > 0
    assert_close(out["pyllmops"], out["eager"].double(), 1e-5, "decode after right padding")


def test_row_without_real_tokens(calls):
    """A row that is all padding has zero queries and zero keys: no error, and the other rows are exact."""
    torch.manual_seed(5)
    model = mistral(window=4)
    ids = torch.randint(1, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1] = 0
    mask[2, :5] = 0
    out = {}
    for impl in ("eager", "pyllmops"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert calls[0] > 0
    assert_close(out["pyllmops"][keep], out["eager"][keep].double(), 1e-5, "real tokens next to an empty row")
    assert torch.isfinite(out["pyllmops"]).all()
