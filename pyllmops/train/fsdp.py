"""FSDP2 for pyllmops' models: shard a (Q)LoRA Decoder with torch.distributed.fsdp.fully_shard, and the
checkpoints of a sharded run (adapters in peft format, optimizer in torch.distributed.checkpoint).

Sharding (shard_model): every decoder layer is one FSDP2 unit (its 4-bit base, statistics, norms and
adapters are all-gathered together before the layer's forward, and again before its backward, and
freed after each), the embeddings are another, the root holds the final norm and lm_head. The
quantized bases are uint8 parameters (NF4Linear always; IntLinear once prepare_storage moved its
buffers there), so FSDP2 shards them along dim 0 like any parameter: each rank keeps about 1/world of
the packed bytes and statistics. Only the adapters require gradients, so only they are
reduce-scattered and have optimizer state.

Checkpoint layout (save_checkpoint), one directory per step:
  <dir>/adapter_model.safetensors   every trainable parameter, gathered, in peft keys (as the single-process
                                    checkpoint: pyllmops.train.checkpoint.trainable_state_dict); rank 0 writes it
  <dir>/fsdp/                       torch.distributed.checkpoint of the AdamW state (sharded; loads at any
                                    world size)
  <dir>/fsdp_loop.json              step, world size, the loop's settings
  <dir>/rng/rank<r>.pt              each rank's RNG state (restored when the world size is unchanged)
"""
import json
import os

import torch
import torch.distributed as dist

from pyllmops.nn.lora import PEFT_PREFIX, IntLinear
from pyllmops.nn.nf4 import _full

FSDP_DIR = "fsdp"
LOOP_FILE = "fsdp_loop.json"
ADAPTER_FILE = "adapter_model.safetensors"


def prepare_storage(model):
    """Moves every IntLinear's qweight / scales / zeros into one uint8 parameter (ByteStorage), so
    FSDP2 shards them; NF4Linear stores its bytes in parameters already. Idempotent; returns model."""
    for mod in model.modules():
        if isinstance(mod, IntLinear):
            mod.to_byte_storage(("qweight", "scales", "zeros"))
    return model


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP needs torch.distributed initialized (run under torchrun, or call "
                           "torch.distributed.init_process_group first)")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model, *, mesh=None, param_dtype=None, reduce_dtype=torch.float32, offload=False,
                reshard_after_forward=True):
    """Applies fully_shard to each decoder layer, the embeddings (unless tied to lm_head) and the root.

    param_dtype: compute dtype of the gathered floating parameters (e.g. torch.bfloat16; the uint8
    4-bit storage is never cast); reduce_dtype: gradient reduce-scatter dtype. offload: FSDP2's
    CPUOffloadPolicy (sharded parameters, gradients and optimizer state on the CPU). Returns model
    (fully_shard changes it in place)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_sharded(model):
        return model
    prepare_storage(model)
    mesh = mesh or _mesh()
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
              offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy())
    for layer in model.layers:
        if not is_sharded(layer):  # from_pretrained(fsdp=True) shards layers as it builds them
            fully_shard(layer, **kw)
    if not model.config.tie_word_embeddings:
        fully_shard(model.embed_tokens, **kw)
    fully_shard(model, **kw)
    return model


def set_gradient_sync(model, sync):
    """Under FSDP, whether this backward reduce-scatters gradients (False: accumulate unsharded, as
    DDP's no_sync)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def _trainable_keys(model):
    """[(parameter name, checkpoint key)] of the trainable parameters: peft keys for adapters
    (base_model.model.<module path>.lora_A.weight), the parameter name otherwise."""
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            leaf = name.rsplit(".", 1)[-1]
            out.append((name, PEFT_PREFIX + name + ".weight" if leaf in ("lora_A", "lora_B") else name))
    return out


def full_trainable_state_dict(model):
    """Every trainable parameter, whole (gathered from the shards: a collective), in checkpoint keys."""
    params = dict(model.named_parameters())
    return {key: _full(params[name].detach()) for name, key in _trainable_keys(model)}


def load_trainable_state_dict(model, sd):
    """Copies whole tensors (checkpoint keys) into the model's trainable parameters, each rank keeping
    its shard. Every trainable parameter must be present and every key used."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    keys = _trainable_keys(model)
    missing = sorted(k for _, k in keys if k not in sd)
    unknown = sorted(set(sd) - {k for _, k in keys})
    if missing or unknown:
        raise KeyError(f"checkpoint does not match the model's trainable parameters: missing {missing[:8]}, "
                       f"unexpected {unknown[:8]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, key in keys:
            p, v = params[name], sd[key]
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{key} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
            v = v.to(dtype=p.dtype, device=p.device)
            if isinstance(p, DTensor):
                v = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(v)


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_checkpoint(path, model, optimizer, step, settings=None):
    """Writes the layout of the module docstring. Every rank must call it (gathers and DCP are collectives)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    rank, world = _rank_world()
    full = full_trainable_state_dict(model)
    if rank == 0:
        os.makedirs(os.path.join(path, "rng"), exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in full.items()}, os.path.join(path, ADAPTER_FILE),
                  metadata={"format": "pt"})
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(path, FSDP_DIR))
    if world > 1:
        dist.barrier()  # rank 0 made rng/
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(path, "rng", f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(path, LOOP_FILE), "w") as f:
            json.dump({"step": step, "world_size": world, "settings": settings or {}}, f, default=str)
    if world > 1:
        dist.barrier()


def is_fsdp_checkpoint(path):
    return os.path.isfile(os.path.join(path, LOOP_FILE))


def load_checkpoint(path, model, optimizer=None):
    """Loads a save_checkpoint directory into a sharded (or plain) model at any world size: the
    adapters from the peft file, the optimizer through DCP (resharded), the RNG when the world size is
    the same. Returns (step, settings)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not isinstance(path, (str, os.PathLike)) or not is_fsdp_checkpoint(path):
        raise ValueError(f"checkpoint path {path!r} is not an FSDP checkpoint directory (no {LOOP_FILE})")
    with open(os.path.join(path, LOOP_FILE)) as f:
        meta = json.load(f)
    load_trainable_state_dict(model, load_file(os.path.join(path, ADAPTER_FILE)))
    if optimizer is not None:
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # initializes the state to load into
        dcp.load(state, checkpoint_id=os.path.join(path, FSDP_DIR))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rank, world = _rank_world()
    if world == meta["world_size"]:
        rng = torch.load(os.path.join(path, "rng", f"rank{rank}.pt"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(meta["step"]), meta["settings"]


def shard_bytes(model):
    """{"local": bytes of the uint8 (quantized) parameters this rank holds, "total": their whole size}."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        if p.dtype == torch.uint8:
            t = p.to_local() if isinstance(p, DTensor) else p
            local += t.numel()
            total += p.numel()
    return {"local": local, "total": total}


__all__ = ["shard_model", "prepare_storage", "set_gradient_sync", "full_trainable_state_dict",
           "load_trainable_state_dict", "save_checkpoint", "load_checkpoint", "is_fsdp_checkpoint", "shard_bytes"]
