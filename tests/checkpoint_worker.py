"""Fork server for test_checkpoint.py's kill test: imports torch and pyllmops once, then runs each training
attempt in a forked child that the test kills with SIGKILL at a random time.

argv: steps slow_fsync_s. Protocol (one line each way per attempt):
    test -> server  "run <checkpoint_dir> <out_file>"    (checkpoint_dir "-": the uninterrupted reference run)
    server -> test  "child <pid>"                         (the child starts training; the test may kill it)
    server -> test  "exit <code> <signal> <seconds>"      (after the child ended: 0 0 when it finished)

A child runs a tiny SFT, checkpointing every step and resuming from the newest complete checkpoint
(resume_from="latest"), and writes the final trainable tensors to out_file (via a temporary name and a
rename, so a killed child never leaves a partial out_file). slow_fsync_s > 0 makes every fsync of a
checkpoint write that much slower, so that random kill times often land inside a save (the test counts how
many did by the temporary directories they leave)."""
import os
import sys
import time
import traceback

import torch

torch.set_num_threads(1)

import pyllmops  # noqa: E402
from pyllmops import train  # noqa: E402
from pyllmops.models import PROJECTIONS, Decoder, DecoderConfig  # noqa: E402
from pyllmops.train import checkpoint as ckpt  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def tiny_model():
    torch.manual_seed(7)
    model = Decoder(DecoderConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                  num_kv_heads=1, initializer_range=0.1))
    return pyllmops.apply_lora(model, r=4, alpha=8, target_modules=PROJECTIONS)


def attempt(checkpoint_dir, out_file, steps, data):
    model = tiny_model()
    kw = {} if checkpoint_dir == "-" else dict(checkpoint_dir=checkpoint_dir, checkpoint_every=1, resume_from="latest")
    train.sft(model, data, steps=steps, batch_tokens=96, lr=5e-3, warmup_steps=2, seed=1, progress=False, **kw)
    save_file({k: v.contiguous() for k, v in ckpt.trainable_state_dict(model).items()}, out_file + ".tmp")
    os.replace(out_file + ".tmp", out_file)


def main():
    steps, slow = int(sys.argv[1]), float(sys.argv[2])
    if slow > 0:
        real_fsync = os.fsync

        def slow_fsync(fd):
            time.sleep(slow)
            real_fsync(fd)

        os.fsync = slow_fsync  # this server process (and its children) only
    data = train.instruction_data()[:48]
    for line in sys.stdin:
        cmd, checkpoint_dir, out_file = line.split()
        assert cmd == "run", line
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                attempt(checkpoint_dir, out_file, steps, data)
            except BaseException:  # noqa: BLE001  (reported through the exit code and stderr)
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        print(f"exit {code} {sig} {time.perf_counter() - t0:.4f}", flush=True)


if __name__ == "__main__":
    main()
