"""The SFT and DPO loops under torchrun with DDP: 2 CPU processes (gloo) with grad_accum=1 take the same
steps as one process with grad_accum=2 over the same micro-batches."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_cpu_processes_match_one_process_with_accumulation(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYLLMOPS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "ddp_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, p in r0["adapters"].items():
        assert torch.equal(p, r1["adapters"][name]), f"ranks disagree on {name}"
    # the metrics are all-reduced: both ranks log the same numbers
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]

    import ddp_worker

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = ddp_worker.build()
        hist = ddp_worker.run(single, grad_accum=2)
    finally:
        torch.set_num_threads(old)
    moved = 0
    for name, p in single.named_parameters():
        if p.requires_grad:
            q = r0["adapters"][name]
            assert torch.allclose(q, p.detach(), rtol=1e-4, atol=1e-6), name
            moved += int(name.endswith("lora_B") and p.abs().sum() > 0)
    assert moved > 0  # training changed the adapters
    for a, b in zip(hist, r0["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
