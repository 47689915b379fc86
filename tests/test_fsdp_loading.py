"""models.from_pretrained: a Hugging Face-layout model on disk (several shards) loads layer by layer into
the same quantized model as quantizing in memory; its peak host memory (ru_maxrss minus the RSS before
loading, in a fresh process) is about one layer plus the 4-bit model, and under FSDP each rank keeps half."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import pyllmops
from pyllmops.models import PROJECTIONS, Decoder, DecoderConfig
from pyllmops.models.loading import INDEX_FILE, config_from_hf, config_to_hf, from_pretrained, save_pretrained
from pyllmops.nn import IntLinear, NF4Linear

from test_fsdp import torchrun


def tiny(tie=False):
    torch.manual_seed(0)
    return Decoder(DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                                 initializer_range=0.1, tie_word_embeddings=tie, sliding_window=5))


def quantize_in_memory(model, quantize):
    for name, mod in list(model.named_modules()):
        if name.rpartition(".")[2] in PROJECTIONS:
            new = (NF4Linear.from_linear(mod) if quantize == "nf4" else
                   IntLinear.from_linear(mod, bits=int(quantize[3:]), group_size=64))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    return model


@pytest.mark.parametrize("quantize", [None, "nf4", "int4", "int2"])
@pytest.mark.parametrize("tie", [False, True])
def test_from_pretrained_equals_quantizing_in_memory(tmp_path, quantize, tie):
    model = tiny(tie)
    save_pretrained(model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 3  # several shards
    assert config_from_hf(config_to_hf(model.config)) == model.config
    loaded = from_pretrained(tmp_path, quantize)
    x = torch.randint(0, 259, (2, 9))
    ref = model(x) if quantize is None else quantize_in_memory(model, quantize)(x)
    assert torch.equal(loaded(x), ref)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters())
    # adapters added layer by layer are the only trainable parameters
    if quantize is not None:
        adapted = from_pretrained(tmp_path, quantize, lora=dict(r=4, target_modules=PROJECTIONS))
        names = [n for n, p in adapted.named_parameters() if p.requires_grad]
        assert len(names) == 2 * 7 * 3 and all(n.endswith(("lora_A", "lora_B")) for n in names)
        # lora_B starts at zero (the fused LoRA kernels sum in another order: not bit-equal)
        torch.testing.assert_close(adapted(x), ref, rtol=1e-5, atol=1e-5)


def test_int_linear_byte_storage_keeps_names_state_dict_and_output():
    """IntLinear's buffers moved into one uint8 parameter (what FSDP2 shards): same attributes, same state
    dict (keys, dtypes, shapes, values), same output; a state dict loads back into it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    ref = IntLinear.from_linear(lin, bits=4, group_size=64)
    moved = IntLinear.from_linear(lin, bits=4, group_size=64).to_byte_storage(("qweight", "scales", "zeros"))
    assert [n for n, _ in moved.named_buffers()] == []
    p = moved.byte_storage
    assert p.dtype == torch.uint8 and not p.requires_grad and p.dim() == 1
    assert p.numel() == sum(t.numel() * t.element_size() for t in (ref.qweight, ref.scales, ref.zeros))
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(moved, name), getattr(ref, name))
    a, b = ref.state_dict(), moved.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    x = torch.randn(5, 128)
    assert torch.equal(moved(x), ref(x))
    other = IntLinear.from_linear(torch.nn.Linear(128, 48), bits=4, group_size=64)
    other.to_byte_storage(("qweight", "scales", "zeros")).load_state_dict(a)
    assert torch.equal(other(x), ref(x))
    bad = dict(a, scales=a["scales"][:, :1])
    with pytest.raises(RuntimeError, match="scales"):
        other.load_state_dict(bad)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of"):
        from_pretrained(tmp_path, "nf8")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(tiny().config)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path, "nf4")


# A model big enough that its layers dominate the process' noise: 8 layers of 7.1 M parameters (14 MB in
# bf16 each), one shard per layer.
BIG = DecoderConfig(vocab_size=512, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=8,
                    num_kv_heads=8)


def write_random_hf(path, cfg, dtype=torch.bfloat16):
    """Writes cfg's model in the HF layout from random tensors, one layer per shard (this process holds one
    layer at a time)."""
    torch.manual_seed(0)
    with torch.device("meta"):  # names and shapes
        meta = Decoder(cfg)
    groups = [{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}]
    groups += [{f"model.layers.{i}.{n}" for n, _ in layer.named_parameters()} for i, layer in enumerate(meta.layers)]
    hf = {("lm_head.weight" if n == "lm_head.weight" else "model." + n): p for n, p in meta.named_parameters()}
    weight_map = {}
    for g, names in enumerate(groups):
        fn = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in sorted(names):
            shape = hf[n].shape
            tensors[n] = (torch.ones(shape, dtype=dtype) if n.endswith("norm.weight") else
                          torch.empty(shape, dtype=dtype).uniform_(-shape[-1] ** -0.5, shape[-1] ** -0.5))
            weight_map[n] = fn
        save_file(tensors, os.path.join(path, fn))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    layer = sum(p.numel() for p in meta.layers[0].parameters())
    largest = max(p.numel() for p in meta.layers[0].parameters())
    dense = sum(p.numel() for n, p in meta.named_parameters() if not n.startswith("layers."))
    return {"layer": layer * dtype.itemsize, "matrix_fp32": largest * 4, "dense": dense * dtype.itemsize,
            "model": sum(p.numel() for p in meta.parameters()) * dtype.itemsize}


def test_loader_peak_memory_single_and_fsdp(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    sizes = write_random_hf(d, BIG)
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the OS at once: RSS follows the live set
    (fsdp0, fsdp1), = torchrun(tmp_path, [f"load:{d},fsdp"], nproc=2, env=env)
    (single,), = torchrun(tmp_path, [f"load:{d}"], nproc=1, env=env)
    quantized = single["shard"]["total"]
    assert quantized < sizes["model"] / 3  # 4-bit + statistics vs bf16
    report = []
    for res in (single, fsdp0, fsdp1):
        local = res["shard"]["local"]
        # one layer in bf16 + the matrix being quantized in fp32 and the quantizer's own temporaries (up to
        # one more fp32 matrix) + this rank's 4-bit bytes + the dense embeddings / lm_head / norms
        # (+ adapters, < 1 MB) ...
        expected = sizes["layer"] + 2 * sizes["matrix_fp32"] + local + sizes["dense"]
        report.append((res["peak_added"] / 2**20, expected / 2**20, local / 2**20))
        # ... within 25% + 16 MB of allocator and runtime slack; far below the whole model in bf16
        assert res["peak_added"] <= 1.25 * expected + 16 * 2**20, report
        assert res["peak_added"] < 0.6 * sizes["model"], report
    assert fsdp0["shard"]["local"] + fsdp1["shard"]["local"] == quantized
    assert abs(fsdp0["shard"]["local"] - quantized / 2) < 0.01 * quantized
    # the sharded model computes what the single-process one does
    torch.testing.assert_close(fsdp0["logits"], single["logits"], rtol=1e-5, atol=1e-5)
    print("peak added MiB, expected MiB, 4-bit MiB (single, rank 0, rank 1):", report)
