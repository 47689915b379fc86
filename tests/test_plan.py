"""python -m pyllmops plan: the report's machine-readable lines, config.json input, advice; and the estimate
against torch's MemTracker / FSDPMemTracker within 10%: real CPU steps (1 process, FSDP on 2 processes) at
small and medium configs, and 7B / 13B / 70B layer shapes under FakeTensorMode."""
import contextlib
import io
import json
import re

import pytest
import torch.distributed as dist

from pyllmops import plan
from pyllmops.__main__ import main
from pyllmops.models.decoder import DecoderConfig
from pyllmops.models.loading import config_to_hf

from test_fsdp import torchrun
from train_fixtures import one_thread  # noqa: F401  (autouse: the CPU kernels at 1 thread, as the workers)

SMALL = dict(vocab_size=259, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=4, num_kv_heads=2)
MEDIUM = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2)
CPU = dict(seq_len=128, batch=2, lora_r=8, device="cpu")  # 256 tokens, fp32


def run_cli(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["plan", *argv])
    text = buf.getvalue()
    total = float(re.search(r"^total per rank: ([0-9.]+) GiB$", text, re.M).group(1))
    fits = re.search(r"^fits: (yes|no)$", text, re.M).group(1)
    return text, total, fits


def test_cli_lines_config_json_and_advice(tmp_path):
    text, total, fits = run_cli("--model", "llama-70b", "--gpus", "2", "--gpu-mem", "24GiB", "--checkpointing")
    for part in ("weights (quantized + norms)", "gathered (FSDP)", "adapters", "adapter grads", "AdamW state",
                 "activations", "largest temporary"):
        assert part in text
    assert fits == ("yes" if total <= 24 else "no")
    # a config.json gives the same plan as the preset
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_hf(plan.model_config("llama-70b"))))
    assert run_cli("--model", str(path), "--gpus", "2", "--gpu-mem", "24GiB", "--checkpointing")[1] == total
    # too small: says what to turn on, and that advice fits
    text, total, fits = run_cli("--model", "llama-70b", "--gpus", "1", "--gpu-mem", "24GiB")
    assert fits == "no" and "to fit, turn on: --checkpointing" in text
    # more memory per part with a longer sequence; the CPU estimate has no CUDA context
    assert run_cli("--model", "llama-7b", "--seq-len", "4096")[1] > run_cli("--model", "llama-7b")[1]
    assert "CUDA context" not in run_cli("--model", "llama-7b", "--device", "cpu")[0]
    for bad, match in ((["--model", "llama-8b"], "llama-7b"), (["--model", "llama-7b", "--gpus", "0"], "--gpus"),
                       (["--model", "llama-7b", "--gpu-mem", "lots"], "--gpu-mem")):
        with pytest.raises(SystemExit, match=match):
            main(["plan", *bad])


def test_quantized_bytes_match_the_formats():
    import torch

    import pyllmops

    w = torch.randn(96, 256)
    packed, state = pyllmops.quantize_nf4(w, 64, True)
    stored = packed.numel() + sum(t.numel() * t.element_size() for t in (state.absmax, state.nested_absmax,
                                                                         state.nested_code, state.nested_offset))
    assert plan.quantized_bytes(96, 256, "nf4") == stored
    q, s, z = pyllmops.quantize_int(w, 2, 64)
    assert plan.quantized_bytes(96, 256, "int2") == sum(t.numel() * t.element_size() for t in (q, s, z))


def _close(estimate, measured):
    assert abs(estimate - measured) <= 0.10 * measured, (estimate / 2**20, measured / 2**20)


@pytest.mark.parametrize("config", [SMALL, MEDIUM], ids=["small", "medium"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_vs_real_cpu_step_one_process(config, checkpointing):
    setup = plan.Setup(gpus=1, checkpointing=checkpointing, **CPU)
    cfg = DecoderConfig(**config)
    _close(plan.estimate(cfg, setup)["total"], plan.measure(cfg, setup, fake=False))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_estimate_vs_real_cpu_step_fsdp_two_processes(tmp_path):
    specs = [{"config": c, "setup": dict(gpus=2, checkpointing=ck, **CPU)} for c, ck in ((SMALL, False), (MEDIUM, True))]
    results = torchrun(tmp_path, [f"measure:{json.dumps(s)}" for s in specs])
    for spec, ranks in zip(specs, results):
        est = plan.estimate(DecoderConfig(**spec["config"]), plan.Setup(**spec["setup"]))["total"]
        print("FSDP 2 ranks", spec, "estimate MiB", est / 2**20, "measured MiB", [r["peak"] / 2**20 for r in ranks])
        for r in ranks:
            _close(est, r["peak"])


# 7B / 13B / 70B layer shapes (full hidden, intermediate, heads, vocab; 2 layers: the estimate is linear in
# the layer count), seq_len 2048, bf16 activations as on a GPU, under FakeTensorMode.
@pytest.mark.parametrize("model,gpus,quantize,checkpointing", [
    ("llama-7b", 1, "nf4", False), ("llama-13b", 2, "int2", True), ("llama-70b", 2, "nf4", True)])
def test_estimate_vs_fake_tracker_at_big_shapes(model, gpus, quantize, checkpointing):
    cfg = DecoderConfig(**{**plan.PRESETS[model], "num_layers": 2})
    setup = plan.Setup(gpus=gpus, quantize=quantize, checkpointing=checkpointing, lora_r=16)
    _close(plan.estimate(cfg, setup)["total"] - plan.CUDA_CONTEXT, plan.measure(cfg, setup, fake=True))
