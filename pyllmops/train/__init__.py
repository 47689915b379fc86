"""SFT and DPO loops on pyllmops' models and kernels: losses, byte tokenizer, shipped synthetic data,
adapter-only checkpoints. See docs/train.md."""
from pyllmops.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
from pyllmops.train.datasets import instruction_data, load_examples, preference_data
from pyllmops.train.loop import dpo, evaluate_dpo, evaluate_sft, lr_at, sft
from pyllmops.train.losses import dpo_loss, sequence_logps, sft_loss
from pyllmops.train.tokenizer import ByteTokenizer

__all__ = ["sft", "dpo", "dpo_loss", "sft_loss", "sequence_logps", "lr_at", "evaluate_sft", "evaluate_dpo",
           "ByteTokenizer", "instruction_data", "preference_data", "load_examples", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "verify_checkpoint"]
