"""Tokenized examples, the packed micro-batches the loops train on, and their deterministic order.

A micro-batch is a set of sequences packed back to back without padding: tokens (total,), targets
(total,) (the next token where the loss counts, IGNORE elsewhere), cu_seqlens int32 (n + 1,) and
seq_ids (total,). The model sees it through flash_attention_varlen, so no sequence attends to another.
"""
import copy
import random

import torch

from pyllmops.models.decoder import cu_seqlens_from_lengths
from pyllmops.train.losses import IGNORE


def encode_pair(tok, prompt, completion, max_seq_len):
    """[bos] prompt completion [eos] -> (tokens, targets): targets[i] = tokens[i + 1] where tokens[i + 1]
    belongs to the completion (its eos included), IGNORE on the prompt and at the last position.
    Longer sequences are cut to max_seq_len from the right (the prompt is kept whole)."""
    if hasattr(tok, "encode_pair_ids"):  # e.g. a Hugging Face tokenizer (chat template)
        p, c = tok.encode_pair_ids(prompt, completion)
    else:
        p, c = tok.encode(prompt, bos=True), tok.encode(completion, eos=True)
    if len(p) >= max_seq_len:
        raise ValueError(f"a prompt of {len(p)} tokens does not fit max_seq_len={max_seq_len} with its completion: "
                         f"{prompt[:60]!r}")
    tokens = (p + c)[:max_seq_len]
    targets = [IGNORE] * (len(p) - 1) + tokens[len(p):] + [IGNORE]
    return tokens, targets


class Batch:
    __slots__ = ("tokens", "targets", "cu_seqlens", "seq_ids", "positions", "max_seqlen", "num_seqs", "num_tokens")

    def __init__(self, seqs):
        lengths = [len(t) for t, _ in seqs]
        self.tokens = torch.tensor([x for t, _ in seqs for x in t], dtype=torch.long)
        self.targets = torch.tensor([x for _, g in seqs for x in g], dtype=torch.long)
        self.cu_seqlens = cu_seqlens_from_lengths(lengths, "cpu")
        self.seq_ids = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths))
        self.num_seqs, self.num_tokens = len(seqs), sum(lengths)
        # position of each token in its own sequence (models that take position ids, e.g. transformers')
        self.positions = torch.arange(self.num_tokens) - self.cu_seqlens[:-1].long()[self.seq_ids]
        self.max_seqlen = max(lengths) if lengths else 0

    def to(self, device):
        """A copy on `device` (this batch is left as it is, so a plan's batches don't pile up there)."""
        out = copy.copy(self)
        for name in ("tokens", "targets", "cu_seqlens", "seq_ids", "positions"):
            setattr(out, name, getattr(self, name).to(device, non_blocking=True))
        return out


class LazyBatches:
    """A training plan's micro-batches, each built only when the loop asks for it: plan[i] is
    make([items[k] for k in groups[i]]). Holds the index plan, not the batches."""

    def __init__(self, groups, items, make):
        self.groups, self.items, self.make = groups, items, make

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        return self.make([self.items[k] for k in self.groups[i]])


def pack(items, sizes, budget):
    """Greedy packing in order: consecutive items while their sizes sum to <= budget (an item larger than
    the budget goes alone). -> list of lists of items."""
    groups, cur, used = [], [], 0
    for item, size in zip(items, sizes):
        if cur and used + size > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(item)
        used += size
    if cur:
        groups.append(cur)
    return groups


def plan(num_items, sizes, budget, count, seed):
    """`count` micro-batches (lists of item indices): epochs of a seeded shuffle, each packed to `budget`
    tokens. Pure function of its arguments, so a resumed (or another rank's) run sees the same order."""
    out, epoch = [], 0
    while len(out) < count:
        order = list(range(num_items))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.extend(pack(order, [sizes[i] for i in order], budget))
        epoch += 1
    return out[:count]
