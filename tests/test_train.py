"""pyllmops.train: dpo_loss against the formulas, prompt masking, short SFT / DPO runs improve, checkpoint
-> resume equals an uninterrupted run, schedule, data, errors, the demo end to end (short)."""
import json
import math

import pytest
import torch

import pyllmops
from pyllmops import train
from pyllmops.models import PROJECTIONS as TARGETS, Decoder, DecoderConfig
from pyllmops.train.batches import Batch, encode_pair, plan
from pyllmops.train.losses import IGNORE

from train_fixtures import one_thread  # noqa: F401  (autouse)


def lora_model(seed=0, quantize="nf4", init=0.1):
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                  initializer_range=init))
    return pyllmops.apply_lora(model, r=8, alpha=16, target_modules=TARGETS, quantize=quantize)


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- dpo_loss
def _logps(n=64):
    return [torch.randn(n, dtype=torch.float64) * 5 - 20 for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_formulas(beta):
    pc, pr, rc, rr = _logps()
    for loss_type in ("sigmoid", "hinge", "ipo"):
        losses, cr, rj = train.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
        for i in range(pc.numel()):
            h = (pc[i].item() - pr[i].item()) - (rc[i].item() - rr[i].item())
            want = {"sigmoid": math.log1p(math.exp(-beta * h)),  # -log sigmoid(beta h)
                    "hinge": max(0.0, 1 - beta * h),
                    "ipo": (h - 1 / (2 * beta)) ** 2}[loss_type]
            assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12), (loss_type, i)
        assert torch.allclose(cr, beta * (pc - rc)) and torch.allclose(rj, beta * (pr - rr))
        assert not cr.requires_grad


def test_dpo_loss_gradient_and_extremes():
    pc, pr, rc, rr = _logps(8)
    pc.requires_grad_(True)
    losses, _, _ = train.dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    h = (pc - pr - rc + rr).detach()
    # d/dpc of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    assert torch.allclose(pc.grad, -0.1 * torch.sigmoid(-0.1 * h))
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    zero = torch.zeros(2)
    losses, _, _ = train.dpo_loss(big, zero, zero, zero, beta=1.0)
    assert torch.isfinite(losses).all() and losses[0] == 0 and losses[1] == pytest.approx(1e4)


def test_dpo_loss_bad_inputs():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        train.dpo_loss(a, a, a, a, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be a positive number, got 0"):
        train.dpo_loss(a, a, a, a, beta=0)
    with pytest.raises(ValueError, match="ref_rejected_logps has shape \\(4,\\)"):
        train.dpo_loss(a, a, a, torch.zeros(4))
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        train.dpo_loss([0.0], a, a, a)


# ---------------------------------------------------------------- masking, log-probs
def test_sft_targets_mask_the_prompt():
    tok = train.ByteTokenizer()
    tokens, targets = encode_pair(tok, "upper: ab\n", "AB", 64)
    p = len(tok.encode("upper: ab\n", bos=True))
    assert tokens == tok.encode("upper: ab\n", bos=True) + tok.encode("AB", eos=True)
    assert targets[:p - 1] == [IGNORE] * (p - 1)           # predicting prompt tokens never counts
    assert targets[p - 1:-1] == tokens[p:]                  # each completion token (and eos) counts once
    assert targets[-1] == IGNORE


def test_sft_loss_counts_completion_tokens_only():
    tok = train.ByteTokenizer()
    batch = Batch([encode_pair(tok, "repeat: zo\n", "zo zo", 64), encode_pair(tok, "add: 1+2\n", "3", 64)])
    logits = torch.randn(batch.num_tokens, 259, dtype=torch.float64, requires_grad=True)
    loss = train.sft_loss(logits, batch.targets)
    keep = batch.targets != IGNORE
    want = -torch.log_softmax(logits, -1)[keep].gather(1, batch.targets[keep, None]).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep].abs().sum(-1) > 0).all()
    assert keep.sum().item() == len("zo zo") + 1 + len("3") + 1


def test_sequence_logps_sum_and_mean():
    targets = torch.tensor([IGNORE, 3, 4, IGNORE, IGNORE, 1, IGNORE])
    seq_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    logits = torch.randn(7, 6, dtype=torch.float64)
    lp = torch.log_softmax(logits, -1)
    s = train.sequence_logps(logits, targets, seq_ids, 2)
    m = train.sequence_logps(logits, targets, seq_ids, 2, average=True)
    assert s[0].item() == pytest.approx((lp[1, 3] + lp[2, 4]).item())
    assert s[1].item() == pytest.approx(lp[5, 1].item())
    assert m[0].item() == pytest.approx(s[0].item() / 2)


# ---------------------------------------------------------------- schedule, data
def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [train.lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.lr_at(4, **kw) == pytest.approx(1.0)
    assert train.lr_at(13, **kw) == pytest.approx(0.1)
    mid = train.lr_at(4 + 9 / 2, **kw)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)
    vals = [train.lr_at(s, **kw) for s in range(4, 14)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_shipped_data_and_jsonl(tmp_path):
    sft_rows, pref_rows = train.instruction_data(), train.preference_data()
    assert len(sft_rows) >= 100 and len(pref_rows) >= 100
    assert all(r["chosen"] != r["rejected"] for r in pref_rows)
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in sft_rows[:5]) + "\n\n")
    assert train.load_examples(str(path), ("prompt", "completion")) == sft_rows[:5]
    with pytest.raises(ValueError, match="needs a string 'completion'"):
        train.load_examples([{"prompt": "a"}], ("prompt", "completion"))
    with pytest.raises(TypeError, match="examples must be a JSONL path or a list of dicts, got int"):
        train.load_examples(3, ("prompt", "completion"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        train.load_examples(str(tmp_path / "bad.jsonl"), ("prompt", "completion"))


def test_plan_is_deterministic_and_packs():
    sizes = [5, 9, 3, 7, 4, 6]
    a = plan(6, sizes, 12, 10, seed=1)
    assert a == plan(6, sizes, 12, 10, seed=1) and a != plan(6, sizes, 12, 10, seed=2)
    assert all(sum(sizes[i] for i in g) <= 12 or len(g) == 1 for g in a)
    first_epoch = []
    for g in a:
        first_epoch += g
        if len(first_epoch) >= 6:
            break
    assert sorted(first_epoch[:6]) == list(range(6))  # every example once per epoch


def test_tokenizer_round_trip():
    tok = train.ByteTokenizer()
    ids = tok.encode("héllo", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids[1:-1]) < 256
    assert tok.decode(ids) == "héllo"


# ---------------------------------------------------------------- training runs
def test_short_sft_lowers_the_loss():
    data = train.instruction_data()
    model = lora_model()
    before = train.evaluate_sft(model, data[:32])
    hist = train.sft(model, data[32:], steps=25, batch_tokens=384, lr=1e-2, warmup_steps=3, progress=False)
    after = train.evaluate_sft(model, data[:32])
    assert after < before - 1.0, (before, after)
    assert [r["step"] for r in hist] == list(range(1, 26))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_mb"):
        assert all(math.isfinite(r[key]) and r[key] >= 0 for r in hist), key
    assert hist[0]["lr"] == pytest.approx(1e-2 / 3)


def test_short_dpo_raises_the_margin():
    pref = train.preference_data()
    model = lora_model(seed=1)
    before = train.evaluate_dpo(model, pref[:32])
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # lora_B = 0: policy == reference
    hist = train.dpo(model, pref[32:], steps=25, batch_pairs=8, lr=5e-3, warmup_steps=2, progress=False)
    after = train.evaluate_dpo(model, pref[:32])
    assert after["rewards/margins"] > 0.2 and after["rewards/accuracies"] >= 0.7, after  # from 0 and ~0.5
    assert after["loss"] < before["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(r[key]) for r in hist), key
    r = hist[-1]
    assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_dpo_other_losses_run(loss_type):
    pref = train.preference_data()
    model = lora_model(seed=2, quantize=None)
    hist = train.dpo(model, pref[:40], steps=4, batch_pairs=4, lr=5e-3, warmup_steps=1, loss_type=loss_type,
                     progress=False)
    assert all(math.isfinite(r["loss"]) for r in hist)
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
@pytest.mark.parametrize("train_norm", [False, True])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, kind, train_norm):
    """train_norm: the final norm trains beside the adapters; the checkpoint must carry it too."""
    data = train.instruction_data()[:60] if kind == "sft" else train.preference_data()[:60]
    fn = train.sft if kind == "sft" else train.dpo
    kw = dict(steps=6, lr=5e-3, warmup_steps=2, grad_accum=2, progress=False, seed=3)
    kw.update(batch_tokens=200) if kind == "sft" else kw.update(batch_pairs=4)

    def model():
        m = lora_model(seed=5)
        m.norm.weight.requires_grad_(train_norm)
        return m

    full = model()
    fn(full, data, **kw)
    part = model()
    fn(part, data, checkpoint_dir=str(tmp_path), checkpoint_every=3, **kw)
    resumed = model()  # the same base (checkpoints hold the trained parameters only) ...
    with torch.no_grad():
        for p in resumed.parameters():
            if p.requires_grad:
                p.normal_()  # ... but scrambled trainables: they must come from the checkpoint
    hist = fn(resumed, data, resume_from=str(tmp_path / "step-3"), **kw)
    assert [r["step"] for r in hist] == [4, 5, 6]
    want = adapters(full)
    assert ("norm.weight" in want) == train_norm
    for name, p in adapters(resumed).items():
        assert torch.equal(p, want[name]), name
    for name, p in adapters(part).items():
        assert torch.equal(p, want[name]), name
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "step-6" / "adapter_model.safetensors")).keys())
    lora_keys = {k for k in keys if k.startswith("base_model.model.") and ".lora_" in k}  # peft keys
    assert len(lora_keys) == 2 * len(TARGETS) * 2
    assert keys - lora_keys == ({"norm.weight"} if train_norm else set())


def test_loop_bad_inputs():
    model = lora_model()
    data = train.instruction_data()[:4]
    with pytest.raises(ValueError, match="steps"):
        train.sft(model, data, steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train.sft(model, data, lr=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        train.dpo(model, train.preference_data()[:4], loss_type="bogus")
    with pytest.raises(ValueError, match="resume_from|checkpoint path"):
        train.sft(model, data, steps=1, resume_from="/nonexistent/dir", progress=False)
    dense = Decoder(DecoderConfig())
    with pytest.raises(ValueError, match="adapters"):
        train.dpo(dense, train.preference_data()[:4])
    for p in dense.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.sft(dense, data, steps=1, progress=False)
    with pytest.raises(TypeError, match="model must be a pyllmops.models.Decoder"):
        train.sft(torch.nn.Linear(2, 2), data, steps=1, progress=False)


def test_demo_runs_short():
    from pyllmops import demo

    lines = []
    rep = demo.run(device="cpu", sft_steps=4, dpo_steps=2, progress=False, out=lines.append)
    text = "\n".join(lines)
    assert "QLoRA SFT" in text and "DPO" in text and "paged KV cache" in text
    assert rep["ops"]["generate"].get(("paged_attention", "cpu"), 0) > 0
    assert rep["ops"]["sft"].get(("flash_attn_bwd", "cpu"), 0) > 0
    assert rep["ops"]["sft"].get(("qlora_fwd", "cpu"), 0) > 0


def test_bf16_autocast_runs_kernels_in_bf16_and_keeps_fp32_adapters():
    from pyllmops.demo import OpRecorder

    data = train.instruction_data()[:40]
    kw = dict(steps=2, batch_tokens=256, lr=1e-3, warmup_steps=1, progress=False)
    fp32 = train.sft(lora_model(seed=4), data, **kw)
    model = lora_model(seed=4)
    rec = OpRecorder()
    with rec:
        bf16 = train.sft(model, data, bf16=True, **kw)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert rec.dtypes[("qlora_fwd", torch.bfloat16)] > 0 and rec.dtypes[("flash_attn_fwd", torch.bfloat16)] > 0
