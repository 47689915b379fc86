"""Losses of the SFT and DPO loops: masked token cross-entropy, per-sequence log-probabilities, DPO."""
import torch
import torch.nn.functional as F

IGNORE = -100
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def _wide(logits):
    """float32 at least (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def sft_loss(logits, targets):
    """Mean cross-entropy over the tokens whose target is not IGNORE (-100): the completion tokens.
    logits (tokens, vocab), targets int64 (tokens,) -> scalar (0 with a zero gradient if none counts)."""
    n = (targets != IGNORE).sum()
    return F.cross_entropy(_wide(logits), targets, ignore_index=IGNORE, reduction="sum") / n.clamp(min=1)


def sequence_logps(logits, targets, seq_ids, num_seqs, average=False):
    """Per sequence, the sum (or with average=True the mean) over its counted tokens of
    log softmax(logits)[target]. logits (tokens, vocab), targets (tokens,) with IGNORE where not
    counted, seq_ids (tokens,) in [0, num_seqs) -> (num_seqs,) float32 (float64 for float64 logits)."""
    mask = targets != IGNORE
    lp = torch.log_softmax(_wide(logits), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    lp = lp * mask
    total = lp.new_zeros(num_seqs).index_add(0, seq_ids, lp)
    if not average:
        return total
    count = lp.new_zeros(num_seqs).index_add(0, seq_ids, mask.to(lp.dtype))
    return total / count.clamp(min=1)


def _check_logps(**tensors):
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of log-probabilities, got {t.dtype}")
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {first}'s shape {tuple(shape)}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid"):
    """Direct Preference Optimization losses, per example.

    With the log-ratio margin
        h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))
    (y_w chosen, y_l rejected; the inputs are those four log-probabilities per example):
        sigmoid (DPO, Rafailov et al. 2023, eq. 7):  loss = -log sigmoid(beta * h)
        hinge   (SLiC, Zhao et al. 2023):            loss = max(0, 1 - beta * h)
        ipo     (IPO, Azar et al. 2023, eq. 17):     loss = (h - 1 / (2 * beta))^2
    Implicit rewards (detached): chosen_rewards = beta * (log pi(y_w|x) - log ref(y_w|x)),
    rejected_rewards = beta * (log pi(y_l|x) - log ref(y_l|x)).
    IPO is defined on length-normalized log-probabilities (mean per token; pyllmops.train.dpo passes
    those for loss_type="ipo", as TRL does); sigmoid and hinge take summed ones.

    Args:
        *_logps: float tensors of the same shape (batch,).
        beta: > 0 (the KL strength for sigmoid / ipo, the hinge's inverse margin).
        loss_type: "sigmoid", "hinge" or "ipo".

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (batch,) float.

    Example:
        >>> losses, rc, rr = dpo_loss(pc, pr, rc_ref, rr_ref, beta=0.1)
        >>> losses.mean().backward()
    """
    _check_logps(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {loss_type!r}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
