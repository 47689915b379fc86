"""pyllmops.train.sft / dpo / evaluate_* and models.generate on transformers causal LMs with Hugging Face
tokenizers (tiny model and tokenizer built in the test; no downloads)."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import pyllmops  # noqa: E402
from pyllmops.train.batches import Batch, encode_pair  # noqa: E402
from pyllmops.train.loop import _logits  # noqa: E402
from pyllmops.train.tokenizer import HFTokenizer, as_tokenizer  # noqa: E402

from conftest import assert_close  # noqa: E402
from test_hf_trl import VOCAB, char_tokenizer  # noqa: E402
from train_fixtures import one_thread  # noqa: F401,E402  (autouse)

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def test_hf_tokenizer_prompt_completion_and_chat_template():
    plain = as_tokenizer(char_tokenizer())
    assert isinstance(plain, HFTokenizer)
    p, c = plain.encode_pair_ids("ab", "cd")
    assert p == [1] + plain._ids("ab") and c == plain._ids("cd") + [2]
    chat = as_tokenizer(char_tokenizer(CHAT))
    p, c = chat.encode_pair_ids("ab", "cd")
    assert chat.decode(p) == "<user>ab<assistant>"
    assert chat.decode(c) == "cd" and c[-1] == 2  # the assistant turn ends with eos
    tokens, targets = encode_pair(chat, "ab", "cd", 64)
    assert tokens == p + c and [t for t in targets if t != -100] == c


def test_packed_batch_logits_equal_each_sequence_alone():
    """One row, position ids restarting per sequence, cu_seqlens kwargs: each sequence sees only itself."""
    model = tiny_llama().eval()
    tok = as_tokenizer(char_tokenizer())
    seqs = [encode_pair(tok, p, c, 64) for p, c in (("upper: ab\n", "AB"), ("add: 1+2\n", "3"), ("x", "yz"))]
    batch = Batch(seqs)
    pyllmops.train.loop._check_model(model)
    assert model.config._attn_implementation == "pyllmops"
    with torch.no_grad():
        packed = _logits(model, batch)
        model.set_attn_implementation("eager")
        for i, (t, _) in enumerate(seqs):
            a, b = batch.cu_seqlens[i].item(), batch.cu_seqlens[i + 1].item()
            alone = model(torch.tensor([t])).logits[0]
            assert_close(packed[a:b], alone.double(), 1e-5, f"sequence {i}")


def test_sft_and_evaluate_on_transformers_model_with_chat_template():
    model = tiny_llama()
    pyllmops.apply_lora(model, r=4, alpha=8, target_modules="all-linear")
    tok = char_tokenizer(CHAT)
    data = pyllmops.train.instruction_data()[:32]
    before = pyllmops.train.evaluate_sft(model, data[:8], tokenizer=tok)
    hist = pyllmops.train.sft(model, data, tokenizer=tok, steps=6, batch_tokens=256, lr=3e-3, warmup_steps=1,
                              progress=False)
    assert len(hist) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    after = pyllmops.train.evaluate_sft(model, data[:8], tokenizer=tok)
    assert after < before


def test_dpo_on_peft_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pyllmops.patch(model)
    tok = char_tokenizer()
    data = pyllmops.train.preference_data()[:16]
    hist = pyllmops.train.dpo(model, data, tokenizer=tok, steps=3, batch_pairs=4, lr=1e-3, warmup_steps=1,
                              progress=False)
    assert len(hist) == 3
    assert abs(hist[0]["loss"] - 0.6931) < 1e-3  # lora_B = 0: policy == reference at the first step
    ev = pyllmops.train.evaluate_dpo(model, data[:8], tokenizer=tok)
    assert set(ev) == {"loss", "rewards/margins", "rewards/accuracies"}


def test_generate_takes_transformers_models_and_refuses_others():
    model = tiny_llama(3).eval()
    ref = copy.deepcopy(model)
    prompts = [[1, 40, 41, 42], [1, 50]]
    out = pyllmops.models.generate(model, prompts, max_new_tokens=5)
    for p, o in zip(prompts, out):  # greedy, each prompt alone with transformers' generate
        alone = ref.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert o == alone[0, len(p):].tolist()
    stop = out[0][2]  # a stop token ends its sequence (included), as for the Decoder
    cut = pyllmops.models.generate(model, prompts, max_new_tokens=5, stop_tokens=[stop])
    assert cut[0] == out[0][:out[0].index(stop) + 1]
    with pytest.raises(TypeError, match="Decoder or a transformers causal LM"):
        pyllmops.models.generate(torch.nn.Linear(3, 3), prompts)
    with pytest.raises(TypeError, match="Decoder or a transformers causal LM"):
        pyllmops.train.sft(torch.nn.Linear(3, 3), [{"prompt": "a", "completion": "b"}], steps=1)
