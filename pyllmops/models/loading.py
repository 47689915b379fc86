"""Loading big models without big host memory: from_pretrained builds a Decoder on the meta device and
fills it layer by layer from safetensors shards in the Hugging Face layout, quantizing each projection
as it arrives; save_pretrained writes that layout.

Layout (transformers' Llama / Mistral): <dir>/config.json (LlamaConfig keys), <dir>/model.safetensors or
shards <dir>/model-0000i-of-0000n.safetensors with <dir>/model.safetensors.index.json ({"weight_map":
{tensor name: shard file}}); tensor names model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight,
..., model.norm.weight, lm_head.weight.

Memory: tensors are read with plain file reads (no mmap, whose touched pages would stay resident), one
decoder layer at a time; each projection is quantized from a float32 copy of that one matrix, then the
layer's dense tensors are dropped. Peak host memory is about one layer in the file's dtype, plus one
matrix in float32, plus the quantized model so far (plus the embeddings and lm_head, which stay dense).
Under FSDP (fsdp=True, torch.distributed initialized) each layer is sharded as soon as it is built: a
rank keeps 1/world of the quantized bytes.
"""
import json
import os
import struct

import torch
from torch import nn

from pyllmops.models.decoder import PROJECTIONS, Decoder, DecoderConfig
from pyllmops.nn.lora import IntLinear, apply_lora
from pyllmops.nn.nf4 import NF4Linear

QUANTIZE = (None, "nf4", "int4", "int2")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------- config
def config_from_hf(hf):
    """DecoderConfig from a transformers Llama / Mistral config.json dict (or a path to one)."""
    if isinstance(hf, (str, os.PathLike)):
        with open(hf) as f:
            hf = json.load(f)
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    return DecoderConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                         intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                         num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                         head_dim=hf.get("head_dim"), rope_base=float(hf.get("rope_theta", 10000.0)),
                         rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                         # transformers' window counts the query itself (see DecoderConfig)
                         sliding_window=window - 1 if window else None,
                         tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                         initializer_range=float(hf.get("initializer_range", 0.02)))


def config_to_hf(cfg):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_base,
            "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
            "sliding_window": cfg.sliding_window + 1 if cfg.sliding_window else None,
            "initializer_range": cfg.initializer_range}


# ------------------------------------------------------------------------------ safetensors io
def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class ShardReader:
    """Reads single tensors from the safetensors files of a model directory with plain reads."""

    def __init__(self, path):
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            weight_map = None
        else:
            raise FileNotFoundError(f"{path!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.headers = {fn: _header(os.path.join(path, fn)) for fn in files}
        self.where = {name: fn for fn in files for name in self.headers[fn][1]}
        if weight_map is not None and set(weight_map) != set(self.where):
            raise ValueError(f"{INDEX_FILE} and the shards disagree on tensor names: "
                             f"{sorted(set(weight_map) ^ set(self.where))[:8]}")
        self.path = path

    def names(self):
        return list(self.where)

    def read(self, name):
        if name not in self.where:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.path!r}")
        fn = self.where[name]
        base, header = self.headers[fn]
        info = header[name]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(os.path.join(self.path, fn), "rb") as f:
            f.seek(base + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise ValueError(f"{fn}: tensor {name!r} is truncated")
        return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_pretrained(model, path, max_shard_bytes=2 ** 30, dtype=None):
    """Writes a dense Decoder in the Hugging Face layout (config.json, shards of at most max_shard_bytes,
    the index), tensors in `dtype` (default: as they are)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    names = {n: ("lm_head.weight" if n == "lm_head.weight" else "model." + n) for n, _ in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    sd = model.state_dict()
    shards, cur, size = [], {}, 0
    for n, hf in names.items():
        t = sd[n].detach().to(dtype or sd[n].dtype).contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[hf], size = t, size + nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else SINGLE_FILE
        save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fn
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.config), f, indent=1)


# ---------------------------------------------------------------------------------------- loading
def _check_quantize(quantize):
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {quantize!r}")


def _quantized(weight, quantize, blocksize, double_quant, group_size):
    """The frozen module for a dense (out, in) weight: NF4Linear, IntLinear, or nn.Linear (quantize=None)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    if quantize is None:
        lin.weight = nn.Parameter(weight, requires_grad=False)
        return lin
    lin.weight = nn.Parameter(weight.float(), requires_grad=False)  # one matrix in fp32 at a time
    if quantize == "nf4":
        return NF4Linear.from_linear(lin, blocksize, double_quant)
    if weight.shape[1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {weight.shape[1]}")
    return IntLinear.from_linear(lin, bits=int(quantize[3:]), group_size=group_size)


def _fill(module, prefix, reader, dtype, device):
    """Loads module's own parameters (not its children's) from reader under prefix, assigning them."""
    for name, p in list(module.named_parameters(recurse=False)):
        t = reader.read(prefix + name).to(device=device, dtype=dtype or None)
        setattr(module, name, nn.Parameter(t, requires_grad=False))


def from_pretrained(path, quantize="nf4", *, dtype=None, device="cpu", lora=None, fsdp=False, blocksize=64,
                    double_quant=True, group_size=64, targets=PROJECTIONS):
    """A Decoder from a Hugging Face Llama / Mistral directory, built on the meta device and filled one
    layer at a time.

    Args:
        path: directory with config.json and model.safetensors or sharded model-*.safetensors + index.
        quantize: "nf4" (NF4Linear bases, QLoRA), "int4" / "int2" (IntLinear bases for QA-LoRA), or None
            (dense). Applies to the `targets` projections of every layer; embeddings, norms and lm_head
            stay dense.
        dtype: dtype of the dense tensors (default: the file's); quantized bases decode to float32.
        lora: None, or apply_lora's keyword arguments (r, alpha, target_modules, ...; quantize is taken
            from here): adapters are added layer by layer (needed with fsdp, where a layer is sharded
            as soon as it is built).
        fsdp: shard each layer with FSDP2 as it is built, then the embeddings and the root
            (pyllmops.train.fsdp.shard_model); needs torch.distributed initialized.
    Every parameter is frozen except the adapters.
    """
    _check_quantize(quantize)
    with open(os.path.join(path, "config.json")) as f:
        cfg = config_from_hf(json.load(f))
    reader = ShardReader(path)
    with torch.device("meta"):
        model = Decoder(cfg)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from pyllmops.train.fsdp import _mesh, prepare_storage, shard_model

        mesh = _mesh()
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                w = reader.read(prefix + name + ".weight")
                if child in targets and quantize is not None:
                    new = _quantized(w, quantize, blocksize, double_quant, group_size).to(device)
                else:
                    new = _quantized(w.to(device=device, dtype=dtype or w.dtype), None, 0, False, 0)
                del w
                setattr(parent, child, new)
            else:
                _fill(mod, prefix + name + ("." if name else ""), reader, dtype, device)
        if lora is not None:
            apply_lora(layer, **{**lora, "quantize": None})  # the bases are built above
        if fsdp:
            prepare_storage(layer)
            fully_shard(layer, mesh=mesh)
    _fill(model.embed_tokens, "model.embed_tokens.", reader, dtype, device)
    _fill(model.norm, "model.norm.", reader, dtype, device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        _fill(model.lm_head, "lm_head.", reader, dtype, device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    if fsdp:
        shard_model(model, mesh=mesh)
    return model
