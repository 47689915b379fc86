"""TRL's SFTTrainer and DPOTrainer, with their default configs (bf16 autocast included; use_cpu=True is what
a CPU machine needs), run a few steps on a tiny peft-LoRA Llama patched with pyllmops.patch: the logged
losses equal the unpatched run's within bf16 tolerance, and pyllmops' kernels ran. No downloads: the model
and a character-level tokenizer are built here."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import pyllmops  # noqa: E402
from pyllmops.integrations import patch as patch_mod  # noqa: E402

from train_fixtures import one_thread  # noqa: F401,E402  (autouse)

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}


def char_tokenizer(chat_template=None):
    """A character-level PreTrainedTokenizerFast built in code (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_lora_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the fused LoRA op and of the pyllmops attention function."""
    from transformers.modeling_utils import AttentionInterface

    import pyllmops.integrations.transformers  # noqa: F401

    count = {"lora": 0, "attention": 0}
    fn = patch_mod.lora_linear

    def lora(*a, **k):
        count["lora"] += 1
        return fn(*a, **k)

    attn = AttentionInterface._global_mapping["pyllmops"]

    def attention(*a, **k):
        count["attention"] += 1
        return attn(*a, **k)

    monkeypatch.setattr(patch_mod, "lora_linear", lora)
    monkeypatch.setitem(AttentionInterface._global_mapping, "pyllmops", attention)
    return count


def losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def common_args(tmp_path):
    return dict(output_dir=str(tmp_path), max_steps=3, logging_steps=1, per_device_train_batch_size=4,
                report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)


def test_sft_trainer_patched_matches_unpatched(tmp_path, counted):
    rows = pyllmops.train.instruction_data()[:24]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    out = {}
    for patched in (False, True):
        model = tiny_lora_llama()
        if patched:
            pyllmops.patch(model)
        args = trl.SFTConfig(**common_args(tmp_path / str(patched)))
        assert args.bf16  # TRL's default: bf16 autocast
        out[patched] = losses(trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=char_tokenizer()))
    assert len(out[True]) == 3
    assert counted["lora"] > 0 and counted["attention"] > 0
    for a, b in zip(out[True], out[False]):
        assert abs(a - b) <= 2e-3 * abs(b), (out[True], out[False])


def test_dpo_trainer_patched_matches_unpatched(tmp_path, counted):
    rows = pyllmops.train.preference_data()[:16]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    out = {}
    for patched in (False, True):
        model = tiny_lora_llama()
        with torch.no_grad():  # a non-zero adapter so that policy and reference differ from the first step
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
        if patched:
            pyllmops.patch(model)
        args = trl.DPOConfig(**common_args(tmp_path / str(patched)))
        out[patched] = losses(trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=char_tokenizer()))
    assert len(out[True]) == 3
    assert counted["lora"] > 0 and counted["attention"] > 0
    for a, b in zip(out[True], out[False]):
        assert abs(a - b) <= 2e-3 * max(abs(b), 0.1), (out[True], out[False])
