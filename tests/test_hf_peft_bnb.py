"""pyllmops.patch, apply_lora, save_adapter / load_adapter and the bitsandbytes conversions against the real
transformers, peft and bitsandbytes on tiny models built in the test (no downloads)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

import pyllmops  # noqa: E402
from pyllmops.integrations import bnb as bnb_interop  # noqa: E402
from pyllmops.integrations import patch as patch_mod  # noqa: E402
from pyllmops.nn import LoRALinear, NF4Linear  # noqa: E402

from conftest import assert_close  # noqa: E402
from train_fixtures import one_thread  # noqa: F401,E402  (autouse)

VOCAB = 97


def llama(seed=0):
    """in_features multiples of the 4-bit blocksize 64: bitsandbytes 0.50's CPU dequantize_4bit decodes
    other shapes wrongly (its bytes equal ours; its decode does not, so the oracle would be wrong)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg)


def randomize_lora_b(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused ops patch() routes peft's layers to."""
    count = {"lora": 0, "qlora": 0, "nf4": 0}
    for key, name in (("lora", "lora_linear"), ("qlora", "qlora_linear"), ("nf4", "nf4_linear")):
        fn = getattr(patch_mod, name)

        def counting(*a, _fn=fn, _key=key, **k):
            count[_key] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(patch_mod, name, counting)
    return count


def quantized_llama(tmp_path, seed=0):
    """A tiny Llama saved and reloaded with BitsAndBytesConfig(load_in_4bit=True) (nf4, double quant)."""
    llama(seed).save_pretrained(tmp_path / "base")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=q,
                                                          dtype=torch.float32)
    for m in model.modules():  # keep bitsandbytes' own forward comparable (no CPU-only rewrite mid-test)
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal_training(patched, ref, ids, tol=1e-4):
    lp, gp = loss_and_grads(patched, ids)
    lr, gr = loss_and_grads(ref, ids)
    assert_close(lp, lr.double(), 1e-5, "loss")
    assert gr and set(gp) == set(gr)
    for n in gr:
        assert "lora_" in n
        assert_close(gp[n], gr[n].double(), tol, n)


def test_patch_peft_lora_on_linear(fused_calls, tmp_path):
    base = llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora_b(pm)
    pm.base_model.model.set_attn_implementation("eager")
    ref = copy.deepcopy(pm)
    assert pyllmops.patch(pm) is pm
    assert pm.base_model.model.config._attn_implementation == "pyllmops"
    ids = torch.randint(0, VOCAB, (2, 11))
    check_equal_training(pm, ref, ids)
    assert fused_calls["lora"] == 2 * 7  # 7 linear layers per block, lm_head excluded by all-linear
    # peft's own machinery keeps working on the patched model
    pm.eval()
    ref.eval()
    with torch.no_grad():
        with pm.disable_adapter(), ref.disable_adapter():
            assert_close(pm(ids).logits, ref(ids).logits.double(), 1e-5, "disable_adapter")
        pm.save_pretrained(tmp_path / "adapter")
        loaded = peft.PeftModel.from_pretrained(llama(), tmp_path / "adapter")
        assert_close(loaded(ids).logits, pm(ids).logits.double(), 1e-5, "save_pretrained / from_pretrained")
        expect = pm(ids).logits
        merged = pm.merge_and_unload()
        assert_close(merged(ids).logits, expect.double(), 1e-5, "merge_and_unload")


def test_patch_under_autocast_matches_peft(fused_calls):
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(pm)
    ref = copy.deepcopy(pm)
    ref.base_model.model.set_attn_implementation("sdpa")
    pyllmops.patch(pm)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = pm(ids).logits, ref(ids).logits
    assert ours.dtype == theirs.dtype
    assert_close(ours.float(), theirs.double(), 2e-2, "bf16 autocast logits")
    assert fused_calls["lora"] > 0


def test_patch_qlora_on_bitsandbytes_4bit(tmp_path, fused_calls):
    model = quantized_llama(tmp_path)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_b(pm)
    pm.base_model.model.set_attn_implementation("eager")
    ref = copy.deepcopy(pm)
    before = {n: b.clone() for n, b in pm.named_parameters() if b.dtype == torch.uint8}
    pyllmops.patch(pm)
    ids = torch.randint(0, VOCAB, (2, 10))
    check_equal_training(pm, ref, ids, tol=1e-4)
    assert fused_calls["qlora"] == 2 * 3
    assert fused_calls["nf4"] > 0  # the un-adapted Linear4bit layers too
    for n, b in pm.named_parameters():  # the 4-bit bytes are bitsandbytes' own, untouched
        if n in before:
            assert torch.equal(b, before[n])
    pm.eval()
    with torch.no_grad():  # an eval no-grad forward does not trigger bitsandbytes' CPU rewrite on patched layers
        pm(ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in pm.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_cpu_packed_layout_is_refused():
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer.weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes marks its CPU-only layout
    with pytest.raises(ValueError, match="CPU-only packed layout"):
        bnb_interop.nf4_from_linear4bit(layer, "layer")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), layer)
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="CPU-only packed layout"):
        pyllmops.apply_lora(model, target_modules=["0", "1"])
    assert [type(m) for m in model] == before  # untouched
    with pytest.raises(ValueError, match="CPU-only packed layout"):
        pyllmops.patch(model)
    assert not hasattr(model[1], patch_mod._MARK)


def test_apply_lora_on_bitsandbytes_model_uses_its_bytes(tmp_path):
    model = quantized_llama(tmp_path)
    ref_bytes = model.model.layers[0].self_attn.q_proj.weight.data
    x_ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        before = model(x_ids).logits
    pyllmops.apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.base_layer, NF4Linear)
    assert q.base_layer.weight.data_ptr() == ref_bytes.data_ptr()  # no requantization, no copy
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    with torch.no_grad():
        assert_close(model(x_ids).logits, before.double(), 1e-5, "B = 0: the base model")
    model(x_ids, labels=x_ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_target_modules_rules():
    model = llama()
    from pyllmops.nn.lora import match_target_modules

    names = [n for n, _ in match_target_modules(model, "all-linear")]
    assert len(names) == 14 and "lm_head" not in names
    names = [n for n, _ in match_target_modules(model, r".*\.layers\.1\.self_attn\.(q|k)_proj")]
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    names = [n for n, _ in match_target_modules(model, ["v_proj", "model.layers.0.mlp.up_proj"])]
    assert names == ["model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.v_proj"]
    # the same selections as peft
    for targets in ("all-linear", r".*\.layers\.1\.self_attn\.(q|k)_proj", ["v_proj", "up_proj"]):
        pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=targets))
        theirs = sorted(n[len("base_model.model."):] for n, m in pm.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
        ours = sorted(n for n, _ in match_target_modules(llama(), targets))
        assert ours == theirs, targets


def test_apply_lora_validates_before_mutating():
    """issue: apply_lora(m, ["q_proj", "v_proj"], quantize="int4", group_size=64) failed on v_proj (in_features
    96) after q_proj was replaced. Now nothing changes."""
    model = torch.nn.Module()
    model.q_proj, model.v_proj = torch.nn.Linear(128, 64), torch.nn.Linear(96, 64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="v_proj: group_size 64 does not divide in_features 96"):
        pyllmops.apply_lora(model, target_modules=["q_proj", "v_proj"], quantize="int4", group_size=64)
    assert type(model.q_proj) is torch.nn.Linear and type(model.v_proj) is torch.nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_save_adapter_loads_in_peft_and_back(tmp_path, quantize):
    model = llama(1)
    ref_base = copy.deepcopy(model)
    pyllmops.apply_lora(model, r=4, alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"], quantize=quantize)
    randomize_lora_b(model)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    pyllmops.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").exists()
    with torch.no_grad():
        ours = model(ids).logits
        if quantize is None:  # peft on the same dense base gives the same outputs
            pm = peft.PeftModel.from_pretrained(ref_base, tmp_path / "a").eval()
            assert_close(pm(ids).logits, ours.double(), 1e-5, "PeftModel.from_pretrained(save_adapter)")
    # load_adapter on a fresh model applies LoRA from the config, then loads the weights
    fresh = llama(1)
    if quantize:
        pyllmops.apply_lora(fresh, r=4, alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"], quantize="nf4")
    pyllmops.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert_close(fresh.eval()(ids).logits, ours.double(), 1e-5, "load_adapter")


def test_load_adapter_reads_peft_directories(tmp_path):
    pm = peft.get_peft_model(llama(2), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"]))
    randomize_lora_b(pm)
    pm.eval().save_pretrained(tmp_path / "p")
    ids = torch.randint(0, VOCAB, (1, 7))
    model = llama(2)
    pyllmops.load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        assert_close(model.eval()(ids).logits, pm(ids).logits.double(), 1e-5, "peft adapter loaded by pyllmops")
    # a mismatching model is refused before any change
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape"):
        pyllmops.load_adapter(other, tmp_path / "p")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_linear4bit_round_trip(double_quant):
    """NF4Linear -> bnb Linear4bit (Params4bit.from_prequantized) -> NF4Linear: same bytes, same outputs."""
    lin = torch.nn.Linear(128, 64)
    ours = NF4Linear.from_linear(lin, blocksize=64, double_quant=double_quant)
    theirs = bnb_interop.linear4bit_from_nf4linear(ours)
    theirs.support_avx512bf16_for_cpu = False
    assert isinstance(theirs, bnb.nn.Linear4bit)
    assert torch.equal(theirs.weight.data, ours.weight)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert_close(theirs(x), ours(x).double(), 1e-5, "Linear4bit(from NF4Linear)")
        back = bnb_interop.nf4linear_from_linear4bit(theirs)
        assert torch.equal(back(x), ours(x))
    # and a layer bitsandbytes quantized itself
    own = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    own.load_state_dict(lin.state_dict())
    own = own.to("cpu")
    own.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert_close(bnb_interop.nf4linear_from_linear4bit(own)(x), own(x).double(), 1e-5, "NF4Linear(Linear4bit)")
