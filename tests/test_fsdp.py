"""FSDP2 QLoRA on CPU (gloo): 2 processes equal 1, each rank holds half the 4-bit bytes, DCP resume across
world sizes. One torchrun launch runs every 2-process job (tests/fsdp_worker.py); the 1-process runs go
in-process in a 1-rank process group."""
import contextlib
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

MIXED = "train:int4,bf16,ckpt,offload"  # QA-LoRA base, bf16 compute + fp32 reduce, recomputation, CPU offload


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYLLMOPS_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))


@contextlib.contextmanager
def one_rank():
    """A 1-process gloo group in this process (fsdp=True needs one), 1 thread as the workers."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(old)


def torchrun(out, jobs, nproc=2, extra=(), env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *(extra or ("--standalone",)), "--nproc_per_node",
           str(nproc), os.path.join(HERE, "fsdp_worker.py"), str(out), *jobs]
    res = subprocess.run(cmd, env={**worker_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return [[torch.load(os.path.join(out, f"job{i}-rank{r}.pt")) for r in range(nproc)] for i in range(len(jobs))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{job: [rank results]} at world 2, and {job: result} at world 1."""
    import fsdp_worker

    tmp = tmp_path_factory.mktemp("fsdp")
    d1, d2 = str(tmp / "ckpt1"), str(tmp / "ckpt2")
    one = {}
    with one_rank():
        one["save1"] = fsdp_worker.run_job(f"save:{d1}")
    jobs2 = ["train:nf4", MIXED, f"save:{d2}", f"resume:{d1}/step-2"]
    two = dict(zip(["train:nf4", MIXED, "save2", "resume1->2"], torchrun(tmp, jobs2)))
    with one_rank():
        for job in ("train:nf4", MIXED):
            one[job] = fsdp_worker.run_job(job)
        one["resume2->1"] = fsdp_worker.run_job(f"resume:{d2}/step-2")
    return one, two, d1, d2


def assert_same_run(a, b, rtol, atol):
    assert [h["tokens"] for h in a["history"]] == [h["tokens"] for h in b["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=rtol), (x, y)
    assert a["adapters"].keys() == b["adapters"].keys() and a["adapters"]
    for k, v in a["adapters"].items():
        torch.testing.assert_close(v, b["adapters"][k], rtol=rtol, atol=atol, msg=k)


def test_two_processes_match_one_fp32(runs):
    one, two, _, _ = runs
    r0, r1 = two["train:nf4"]
    # ranks agree exactly (metrics all-reduced, adapters gathered from the same shards)
    assert [h["loss"] for h in r0["history"]] == [h["loss"] for h in r1["history"]]
    for k, v in r0["adapters"].items():
        assert torch.equal(v, r1["adapters"][k]), k
    assert_same_run(one["train:nf4"], r0, rtol=1e-4, atol=1e-6)
    # the adapters moved (lora_B starts at zero) and the DPO steps ran
    assert sum(int(k.endswith("lora_B.weight") and v.abs().sum() > 0) for k, v in r0["adapters"].items()) > 0
    assert len(r0["history"]) == 5 and "rewards/margins" in r0["history"][-1]


def test_mixed_precision_offload_checkpointing_int4(runs):
    one, two, _, _ = runs
    # bf16 gathers and compute: the same run within bf16 rounding; fp32 reduce
    assert_same_run(one[MIXED], two[MIXED][0], rtol=2e-2, atol=2e-3)
    assert all(torch.isfinite(v).all() for v in two[MIXED][0]["adapters"].values())


@pytest.mark.parametrize("job", ["train:nf4", MIXED])
def test_each_rank_holds_half_the_4bit_bytes(runs, job):
    one, two, _, _ = runs
    total = one[job]["shard"]["total"]
    assert one[job]["shard"]["local"] == total > 0
    shares = [r["shard"]["local"] for r in two[job]]
    assert sum(shares) == total and all(r["shard"]["total"] == total for r in two[job])
    # dim-0 sharding: each rank's share is half, up to one row's padding per parameter
    assert all(abs(s - total / 2) <= 0.02 * total for s in shares), (shares, total)


def test_dcp_resume_across_world_sizes(runs):
    one, two, d1, d2 = runs
    unbroken1, unbroken2 = one["save1"], two["save2"][0]
    # saved at world 1, resumed at world 2 (steps 3-4) == the uninterrupted world-1 run
    assert_same_run({"history": unbroken1["history"][2:], "adapters": unbroken1["adapters"]},
                    two["resume1->2"][0], rtol=1e-4, atol=1e-6)
    # saved at world 2, resumed at world 1 == the uninterrupted world-2 run
    assert_same_run({"history": unbroken2["history"][2:], "adapters": unbroken2["adapters"]},
                    one["resume2->1"], rtol=1e-4, atol=1e-6)
    # one peft-format adapter file per step, the optimizer in DCP, written once
    from safetensors.torch import load_file

    for d in (d1, d2):
        files = sorted(os.listdir(os.path.join(d, "step-4")))
        assert files == ["adapter_model.safetensors", "fsdp", "fsdp_loop.json", "rng"], files
        sd = load_file(os.path.join(d, "step-4", "adapter_model.safetensors"))
        assert all(k.startswith("base_model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                   for k in sd)
        for k, v in sd.items():
            torch.testing.assert_close(v, (unbroken1 if d == d1 else unbroken2)["adapters"][k])


def test_two_nodes_run_the_same_loop(runs, tmp_path):
    """torchrun --nnodes=2: two launchers ("nodes", here on one machine with a static rendezvous at
    127.0.0.1), one process each, run the same FSDP loop as one launcher with 2 processes."""
    _, two, _, _ = runs
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc_per_node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
               os.path.join(HERE, "fsdp_worker.py"), str(tmp_path), "train:nf4"]
        procs.append(subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    for rank in (0, 1):
        res = torch.load(os.path.join(tmp_path, f"job0-rank{rank}.pt"))
        assert_same_run(res, two["train:nf4"][rank], rtol=1e-6, atol=0)


def test_resume_latest_is_refused_under_fsdp(tmp_path):
    import fsdp_worker
    from pyllmops import train

    with one_rank():
        with pytest.raises(ValueError, match="resume_from='latest' is not supported with fsdp=True"):
            train.sft(fsdp_worker.build(), train.instruction_data()[:8], steps=1, fsdp=True, progress=False,
                      resume_from="latest", checkpoint_dir=str(tmp_path))
