"""The SFT and DPO loops: setup, loop, log, checkpoint; one shared engine (`_train`), two step functions.

Each optimizer step runs grad_accum micro-batches per process (each micro-batch: the mean loss over
it, divided by grad_accum), clips the global gradient norm, and takes an AdamW step on the trainable
parameters only, at a learning rate warmed up linearly then decayed along a cosine. Under torchrun
(torch.distributed initialized, gloo on CPU, nccl on GPU) the model is wrapped in
DistributedDataParallel, rank r takes micro-batches r, r + world, ... of the shared plan, and
gradients are averaged: N processes with grad_accum=k compute the same update as one process with
grad_accum=N*k. With fsdp=True the model is sharded with FSDP2 instead (pyllmops.train.fsdp: each
decoder layer and the embeddings one unit; bf16 runs gather parameters in bf16 and reduce in fp32),
with the same micro-batch plan and the same update.
"""
import contextlib
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pyllmops.models.decoder import Decoder
from pyllmops.nn.lora import disable_adapters
from pyllmops.nn.nf4 import _full
from pyllmops.ops._common import check_bool, check_int
from pyllmops.train.batches import Batch, LazyBatches, encode_pair, plan
from pyllmops.train import fsdp as fsdp_mod
from pyllmops.train.checkpoint import (has_adapters, latest_checkpoint, load_checkpoint, read_manifest,
                                       save_checkpoint)
from pyllmops.train.datasets import DPO_KEYS, SFT_KEYS, load_examples
from pyllmops.train.losses import LOSS_TYPES, dpo_loss, sequence_logps, sft_loss
from pyllmops.train.tokenizer import as_tokenizer


def lr_at(step, *, lr, warmup_steps, total_steps, min_lr_ratio):
    """Linear warmup over warmup_steps (lr * (step + 1) / warmup_steps), then cosine decay from lr to
    lr * min_lr_ratio at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def _check_number(name, v, low=None, high=None, low_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v!r}")


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_hf(model):
    """A transformers model (PreTrainedModel, possibly inside a peft PeftModel)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) or isinstance(getattr(model, "base_model", None), torch.nn.Module) \
        and any(isinstance(m, PreTrainedModel) for m in model.modules())


def _check_model(model):
    if isinstance(model, Decoder):
        return
    if _is_hf(model):
        import pyllmops.integrations.transformers as hf  # registers "pyllmops"

        for m in model.modules():  # packing runs on our varlen attention (position ids / cu_seqlens)
            cfg = getattr(m, "config", None)
            if hasattr(m, "set_attn_implementation") and getattr(cfg, "_attn_implementation", hf.NAME) != hf.NAME:
                m.set_attn_implementation(hf.NAME)
        return
    raise TypeError(f"model must be a pyllmops.models.Decoder or a transformers causal LM (PreTrainedModel, "
                    f"or a peft PeftModel of one), got {type(model).__name__}")


def _logits(module, batch, raw=None):
    """(tokens, vocab) logits of a packed batch: our Decoder takes cu_seqlens; a transformers model takes
    the batch as one row with position ids restarting at each sequence and cu_seq_lens kwargs, which the
    "pyllmops" attention turns into flash_attention_varlen (no sequence attends to another)."""
    raw = module if raw is None else raw
    if isinstance(raw, Decoder):
        return module(batch.tokens, batch.cu_seqlens)
    out = module(input_ids=batch.tokens[None], position_ids=batch.positions[None], use_cache=False,
                 cu_seq_lens_q=batch.cu_seqlens, cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen,
                 max_length_k=batch.max_seqlen)
    return out.logits[0]


def _sft_loss(module, raw, batch):
    """sft_loss of the batch's logits. An unwrapped Decoder takes the chunked loss (Decoder.target_loss: the
    (tokens, vocab) logits are never materialized); a DDP / FSDP wrapper or a transformers model runs its
    forward and sft_loss (a wrapper's hooks run on forward only)."""
    raw = module if raw is None else raw
    if isinstance(raw, Decoder) and module is raw and not fsdp_mod.is_sharded(raw):
        return raw.target_loss(batch.tokens, batch.targets, batch.cu_seqlens)
    return sft_loss(_logits(module, batch, raw), batch.targets)


def _adapters_off(model):
    """The frozen base model inside the block: peft's disable_adapter() for a PeftModel, else ours."""
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return model.disable_adapter()
    return disable_adapters(model)


def _has_adapters(model):
    return has_adapters(model) or hasattr(model, "peft_config")


@contextlib.contextmanager
def _activation_checkpointing(model, on):
    if isinstance(model, Decoder):
        old, model.gradient_checkpointing = model.gradient_checkpointing, on
        try:
            yield
        finally:
            model.gradient_checkpointing = old
        return
    was = bool(getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)))
    if on and not was:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        if on and not was:
            model.gradient_checkpointing_disable()


def _train(model, micro_batches, step_fn, *, kind, steps, grad_accum, lr, weight_decay, betas, warmup_steps,
           min_lr_ratio, max_grad_norm, bf16, activation_checkpointing, checkpoint_dir, checkpoint_every,
           resume_from, progress, callback, settings, allow_settings_change=False, fsdp=False, fsdp_offload=False):
    """The loop shared by sft and dpo. micro_batches: the whole plan (steps * grad_accum * world);
    step_fn(module, raw_model, batch) -> (loss, {metric: float}, tokens)."""
    _check_model(model)
    check_bool("fsdp", fsdp)
    check_bool("fsdp_offload", fsdp_offload)
    if fsdp and not isinstance(model, Decoder):
        raise TypeError(f"fsdp=True shards a pyllmops.models.Decoder; got {type(model).__name__}")
    device = model.device
    rank, world = _dist()
    if fsdp:
        fsdp_mod.shard_model(model, param_dtype=torch.bfloat16 if (device.type == "cuda" if bf16 is None else bf16)
                             else None, offload=fsdp_offload)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (apply_lora(model, ...) first, or unfreeze some)")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    use_bf16 = (device.type == "cuda") if bf16 is None else bf16
    # everything that changes a run's numbers: a checkpoint resumes only under the settings it was written with
    settings = dict(settings, weight_decay=weight_decay, betas=list(betas), warmup_steps=warmup_steps,
                    min_lr_ratio=min_lr_ratio, max_grad_norm=max_grad_norm, bf16=use_bf16, world_size=world)
    start = 0
    if fsdp and resume_from == "latest":
        raise ValueError("resume_from='latest' is not supported with fsdp=True yet (FSDP checkpoints have no "
                         "manifest): pass a step-N checkpoint directory")
    resume_path = _resume_path(resume_from, checkpoint_dir)
    if resume_path is not None and fsdp:  # any world size; the other settings must match
        start, saved = fsdp_mod.load_checkpoint(resume_path, model, optimizer)
        if start > steps:
            raise ValueError(f"checkpoint {resume_path!r} is at step {start}, beyond steps={steps}")
        changed = sorted(k for k, (a, b) in _world_free(saved, settings).items()
                         if json.dumps(a, default=str) != json.dumps(b, default=str))
        if changed and not allow_settings_change:
            raise ValueError(f"checkpoint {resume_path!r} was written with other settings: {changed} "
                             f"(allow_settings_change=True to resume anyway)")
    elif resume_path is not None:
        saved_step = read_manifest(resume_path)["step"]
        if saved_step > steps:  # checked before load_checkpoint writes anything
            raise ValueError(f"checkpoint {resume_path!r} is at step {saved_step}, beyond steps={steps}")
        start, _ = load_checkpoint(resume_path, model, optimizer, device, settings=settings,
                                   allow_settings_change=allow_settings_change)
    ckpt = _activation_checkpointing(model, activation_checkpointing)
    ckpt.__enter__()
    module = model
    if world > 1 and not fsdp:
        module = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                           device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    history = []
    bar = tqdm(total=steps, initial=start, desc=kind, disable=not progress or rank != 0, dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            cur_lr = lr_at(step, lr=lr, warmup_steps=warmup_steps, total_steps=steps, min_lr_ratio=min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            sums, tokens = {}, 0
            for j in range(grad_accum):
                batch = micro_batches[(step * grad_accum + j) * world + rank].to(device)
                sync = contextlib.nullcontext() if (world == 1 or fsdp or j == grad_accum - 1) else module.no_sync()
                fsdp_mod.set_gradient_sync(model, j == grad_accum - 1)  # FSDP's no_sync
                with sync:
                    with (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()):
                        loss, metrics, n_tok = step_fn(module, model, batch)
                    (loss / grad_accum).backward()
                for k, v in {"loss": loss.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v / grad_accum
                tokens += n_tok
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                vals = torch.tensor(list(sums.values()) + [float(tokens)], dtype=torch.float64, device=device)
                dist.all_reduce(vals)
                sums = {k: v / world for k, v in zip(sums, vals[:-1].tolist())}
                tokens = int(vals[-1].item())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, **sums, "lr": cur_lr, "grad_norm": float(_full(grad_norm)), "tokens": tokens,
                   "tokens_per_s": tokens / dt, "peak_mem_mb": _peak_memory_mb(device), "time_s": dt}
            history.append(rec)
            bar.update(1)
            bar.set_postfix({k: f"{rec[k]:.3g}" for k in ("loss", "lr") + (("rewards/margins",) if kind == "dpo"
                                                                             else ())})
            if callback is not None:
                callback(rec)
            done = step + 1
            if checkpoint_dir is not None and (
                    (checkpoint_every and done % checkpoint_every == 0) or done == steps):
                if fsdp:  # every rank: gathers and DCP are collectives
                    fsdp_mod.save_checkpoint(f"{checkpoint_dir}/step-{done}", model, optimizer, done, settings)
                elif rank == 0:
                    save_checkpoint(f"{checkpoint_dir}/step-{done}", model, optimizer, done, settings)
            if world > 1 and checkpoint_dir is not None:
                dist.barrier()
    finally:
        bar.close()
        ckpt.__exit__(None, None, None)
    return history


def _world_free(saved, settings):
    """{setting: (saved, current)} with the world size and per-process grad_accum replaced by their
    product (micro-batches per step): an FSDP run resumes at another world size with grad_accum scaled."""
    out = {}
    for name, d in (("saved", saved), ("current", settings)):
        d = dict(d)
        d["micro_batches_per_step"] = d.pop("grad_accum", 1) * d.pop("world_size", 1)
        for k, v in d.items():
            out.setdefault(k, [None, None])[0 if name == "saved" else 1] = v
    return out


def _resume_path(resume_from, checkpoint_dir):
    """The checkpoint directory to resume from: resume_from itself, or for "latest" the newest complete
    checkpoint in checkpoint_dir (None, a fresh start, when there is none yet)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        if checkpoint_dir is None:
            raise ValueError("resume_from='latest' needs checkpoint_dir (the directory holding the step-N checkpoints)")
        return latest_checkpoint(checkpoint_dir)
    if not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(f"resume_from must be None, 'latest' or a checkpoint directory path, got "
                        f"{type(resume_from).__name__} {resume_from!r}")
    return resume_from


def _common_checks(steps, grad_accum, lr, weight_decay, warmup_steps, min_lr_ratio, max_grad_norm, bf16,
                   activation_checkpointing, checkpoint_every, batch_tokens, max_seq_len, seed):
    check_int("steps", steps, min_value=1)
    check_int("grad_accum", grad_accum, min_value=1)
    _check_number("lr", lr, 0, low_open=True)
    _check_number("weight_decay", weight_decay, 0)
    check_int("warmup_steps", warmup_steps, min_value=0)
    _check_number("min_lr_ratio", min_lr_ratio, 0, 1)
    if max_grad_norm is not None:
        _check_number("max_grad_norm", max_grad_norm, 0, low_open=True)
    if bf16 is not None:
        check_bool("bf16", bf16)
    check_bool("activation_checkpointing", activation_checkpointing)
    check_int("checkpoint_every", checkpoint_every, min_value=0)
    check_int("batch_tokens", batch_tokens, min_value=1)
    check_int("max_seq_len", max_seq_len, min_value=2)
    check_int("seed", seed, min_value=0)


def sft(model, examples, *, tokenizer=None, steps=100, batch_tokens=1024, grad_accum=1, lr=2e-4, weight_decay=0.0,
        betas=(0.9, 0.999), warmup_steps=10, min_lr_ratio=0.1, max_grad_norm=1.0, max_seq_len=512, seed=0,
        bf16=None, activation_checkpointing=False, checkpoint_dir=None, checkpoint_every=0, resume_from=None,
        progress=True, callback=None, allow_settings_change=False, fsdp=False, fsdp_offload=False):
    """Supervised fine-tuning on prompt/completion examples; the loss counts completion tokens only.

    Each example becomes [bos] prompt completion [eos] (tokenizer: ByteTokenizer by default; a Hugging
    Face tokenizer with a chat template renders the user turn + generation prompt, then the assistant
    turn: see pyllmops.train.tokenizer.HFTokenizer); the cross-entropy counts the completion and its eos. Examples are packed without padding into
    micro-batches of at most batch_tokens tokens (flash_attention_varlen keeps them apart), in a seeded
    shuffle per epoch.

    Args:
        model: pyllmops.models.Decoder, or a transformers causal LM (a peft PeftModel of one too),
            usually with adapters (apply_lora / peft); only parameters with requires_grad train (AdamW).
            A transformers model is switched to the "pyllmops" attention: each packed micro-batch is one
            row with position ids restarting per sequence (flash_attention_varlen inside).
        tokenizer: None (ByteTokenizer) or the model's Hugging Face tokenizer.
        examples: JSONL path or list of {"prompt": str, "completion": str}.
        steps: optimizer steps; grad_accum: micro-batches per step (per process under torchrun).
        lr, weight_decay, betas: AdamW; warmup_steps, min_lr_ratio: the schedule (lr_at).
        max_grad_norm: clip the global gradient norm (None: no clipping).
        bf16: autocast to bfloat16 (default: on CUDA only). activation_checkpointing: recompute layers.
        checkpoint_dir / checkpoint_every: write <dir>/step-N every N steps and at the end, atomically (see
            pyllmops.train.checkpoint); resume_from: a step-N directory to continue from, or "latest": the
            newest complete checkpoint in checkpoint_dir (a fresh start when there is none). The checkpoint is
            verified (checksums) and its loop settings must equal this call's (ValueError naming the changes)
            unless allow_settings_change=True.
        progress: tqdm bar; callback(metrics) after every step.
        fsdp: shard the model with FSDP2 (pyllmops.train.fsdp.shard_model; needs torch.distributed, e.g.
            torchrun); checkpoints then hold the optimizer in torch.distributed.checkpoint and resume at any
            world size (resume_from: a step-N directory). fsdp_offload: FSDP2's CPUOffloadPolicy.

    Returns:
        history: one dict per step: step, loss, lr, grad_norm, tokens, tokens_per_s, peak_mem_mb
        (CUDA: max allocated; CPU: the process's peak RSS), time_s.

    Example:
        >>> model = Decoder(DecoderConfig()); pyllmops.apply_lora(model, r=8, target_modules=[...], quantize="nf4")
        >>> history = sft(model, pyllmops.train.instruction_data(), steps=50)
    """
    _common_checks(steps, grad_accum, lr, weight_decay, warmup_steps, min_lr_ratio, max_grad_norm, bf16,
                   activation_checkpointing, checkpoint_every, batch_tokens, max_seq_len, seed)
    _check_model(model)
    tok = as_tokenizer(tokenizer)
    rows = load_examples(examples, SFT_KEYS)
    encoded = [encode_pair(tok, r["prompt"], r["completion"], max_seq_len) for r in rows]
    _, world = _dist()
    order = plan(len(encoded), [len(t) for t, _ in encoded], batch_tokens, steps * grad_accum * world, seed)
    micro = LazyBatches(order, encoded, Batch)

    def step_fn(module, raw, batch):
        return _sft_loss(module, raw, batch), {}, batch.num_tokens

    settings = dict(kind="sft", steps=steps, batch_tokens=batch_tokens, grad_accum=grad_accum, lr=lr, seed=seed)
    return _train(model, micro, step_fn, kind="sft", steps=steps, grad_accum=grad_accum, lr=lr,
                  weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                  max_grad_norm=max_grad_norm, bf16=bf16, activation_checkpointing=activation_checkpointing,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume_from=resume_from,
                  progress=progress, callback=callback, settings=settings, allow_settings_change=allow_settings_change,
                  fsdp=fsdp, fsdp_offload=fsdp_offload)


def encode_preferences(tok, rows, max_seq_len):
    """Each pair -> ((chosen tokens, targets), (rejected tokens, targets)), prompt tokens not counted."""
    return [(encode_pair(tok, r["prompt"], r["chosen"], max_seq_len),
             encode_pair(tok, r["prompt"], r["rejected"], max_seq_len)) for r in rows]


def preference_batch(pairs):
    """Sequences 2i (chosen) and 2i + 1 (rejected) of one packed Batch."""
    return Batch([s for pair in pairs for s in pair])


def pair_logps(model, batch, average, raw=None):
    """(chosen, rejected) per-pair log-probabilities of a preference_batch under model."""
    logits = _logits(model, batch, raw)
    lp = sequence_logps(logits, batch.targets, batch.seq_ids, batch.num_seqs, average=average)
    return lp[0::2], lp[1::2]


def dpo(model, examples, *, tokenizer=None, beta=0.1, loss_type="sigmoid", steps=100, batch_pairs=8, grad_accum=1,
        lr=5e-5, weight_decay=0.0, betas=(0.9, 0.999), warmup_steps=10, min_lr_ratio=0.1, max_grad_norm=1.0,
        max_seq_len=512, seed=0, bf16=None, activation_checkpointing=False, checkpoint_dir=None, checkpoint_every=0,
        resume_from=None, progress=True, callback=None, allow_settings_change=False, fsdp=False, fsdp_offload=False):
    """Direct Preference Optimization on prompt/chosen/rejected examples (see dpo_loss for the formulas).

    The reference log-probabilities come from the same model with its adapters disabled
    (pyllmops.nn.disable_adapters, under no_grad): the frozen base is the reference, no second copy
    of the weights exists. Each micro-batch packs batch_pairs pairs (chosen and rejected sequences,
    no padding); log-probabilities are summed over completion tokens (averaged per token for "ipo").

    Args:
        model: Decoder with adapters (apply_lora); a model without adapters has no reference: ValueError.
        examples: JSONL path or list of {"prompt", "chosen", "rejected"}.
        beta, loss_type: as dpo_loss. Other arguments as sft.

    Returns:
        history: per step as sft, plus rewards/chosen, rewards/rejected, rewards/margins (means over the
        step's pairs) and rewards/accuracies (share of pairs with chosen reward > rejected reward).
    """
    _common_checks(steps, grad_accum, lr, weight_decay, warmup_steps, min_lr_ratio, max_grad_norm, bf16,
                   activation_checkpointing, checkpoint_every, 1, max_seq_len, seed)
    check_int("batch_pairs", batch_pairs, min_value=1)
    _check_number("beta", beta, 0, low_open=True)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    _check_model(model)
    if not _has_adapters(model):
        raise ValueError("dpo needs a model with adapters (apply_lora, or a peft model): the reference is the model "
                         "with its adapters disabled")
    tok = as_tokenizer(tokenizer)
    pairs = encode_preferences(tok, load_examples(examples, DPO_KEYS), max_seq_len)
    _, world = _dist()
    order = plan(len(pairs), [1] * len(pairs), batch_pairs, steps * grad_accum * world, seed)
    micro = LazyBatches(order, pairs, preference_batch)
    average = loss_type == "ipo"

    def step_fn(module, raw, batch):
        with torch.no_grad(), _adapters_off(raw):
            ref_c, ref_r = pair_logps(raw, batch, average)
        pol_c, pol_r = pair_logps(module, batch, average, raw)
        losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta, loss_type=loss_type)
        metrics = {"rewards/chosen": rc.mean().item(), "rewards/rejected": rr.mean().item(),
                   "rewards/margins": (rc - rr).mean().item(), "rewards/accuracies": (rc > rr).float().mean().item()}
        return losses.mean(), metrics, batch.num_tokens

    settings = dict(kind="dpo", steps=steps, batch_pairs=batch_pairs, grad_accum=grad_accum, lr=lr, beta=beta,
                    loss_type=loss_type, seed=seed)
    return _train(model, micro, step_fn, kind="dpo", steps=steps, grad_accum=grad_accum, lr=lr,
                  weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                  max_grad_norm=max_grad_norm, bf16=bf16, activation_checkpointing=activation_checkpointing,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume_from=resume_from,
                  progress=progress, callback=callback, settings=settings, allow_settings_change=allow_settings_change,
                  fsdp=fsdp, fsdp_offload=fsdp_offload)


@torch.no_grad()
def evaluate_sft(model, examples, *, tokenizer=None, max_seq_len=512):
    """Mean completion-token cross-entropy of the examples (one packed batch, eval mode)."""
    _check_model(model)
    tok = as_tokenizer(tokenizer)
    rows = load_examples(examples, SFT_KEYS)
    batch = Batch([encode_pair(tok, r["prompt"], r["completion"], max_seq_len) for r in rows]).to(model.device)
    was = model.training
    model.eval()
    try:
        return _sft_loss(model, None, batch).item()
    finally:
        model.train(was)


@torch.no_grad()
def evaluate_dpo(model, examples, *, tokenizer=None, beta=0.1, loss_type="sigmoid", max_seq_len=512):
    """{"loss", "rewards/margins", "rewards/accuracies"} of the preference examples (reference: adapters off)."""
    _check_model(model)
    tok = as_tokenizer(tokenizer)
    batch = preference_batch(encode_preferences(tok, load_examples(examples, DPO_KEYS), max_seq_len)).to(model.device)
    was = model.training
    model.eval()
    try:
        average = loss_type == "ipo"
        with _adapters_off(model):
            ref_c, ref_r = pair_logps(model, batch, average)
        pol_c, pol_r = pair_logps(model, batch, average)
        losses, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=beta, loss_type=loss_type)
        return {"loss": losses.mean().item(), "rewards/margins": (rc - rr).mean().item(),
                "rewards/accuracies": (rc > rr).float().mean().item()}
    finally:
        model.train(was)
