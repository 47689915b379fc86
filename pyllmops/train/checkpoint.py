"""Adapter-only checkpoints in safetensors, with the optimizer and step state to resume from.

<dir>/adapter_model.safetensors   the adapters in peft's keys (pyllmops.nn.adapter_state_dict), plus every
                                  other trainable parameter (e.g. a norm trained beside the adapters, or
                                  all of a model without adapters) by its parameter name
<dir>/trainer_state.safetensors   AdamW moments ("optimizer.<param index>.<name>"), RNG states; metadata:
                                  step, the optimizer's param_groups (JSON), the loop's settings (JSON)
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from pyllmops.nn.lora import _ADAPTERS, adapter_state_dict, load_adapter_state_dict

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.safetensors"


def has_adapters(model):
    return any(isinstance(m, _ADAPTERS) for m in model.modules())


def _is_adapter_param(name):
    return name.endswith((".lora_A", ".lora_B")) or name in ("lora_A", "lora_B")


def _other_trainable(model):
    """Trainable parameters that are not LoRA adapters, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_param(n)}


def trainable_state_dict(model):
    """Everything the optimizer updates: the adapters (peft keys) and any other trainable parameter."""
    sd = dict(adapter_state_dict(model)) if has_adapters(model) else {}
    sd.update({n: p.detach() for n, p in _other_trainable(model).items()})
    return sd


def load_trainable_state_dict(model, sd):
    sd = dict(sd)
    if has_adapters(model):
        adapters = {k: sd.pop(k) for k in list(sd) if k.endswith((".lora_A.weight", ".lora_B.weight"))}
        load_adapter_state_dict(model, adapters)
    params = _other_trainable(model)
    missing = sorted(set(params) - set(sd))
    unknown = sorted(set(sd) - set(params))
    if missing or unknown:
        raise KeyError(f"checkpoint does not match the model's trainable parameters: missing {missing[:8]}, "
                       f"unexpected {unknown[:8]}")
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v)


def save_checkpoint(path, model, optimizer, step, settings=None):
    """Writes the two files (see the module docstring) into directory `path`."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()},
              os.path.join(path, ADAPTER_FILE), metadata={"format": "pt"})
    osd = optimizer.state_dict()
    tensors = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optimizer.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": str(step), "param_groups": json.dumps(osd["param_groups"]),
            "settings": json.dumps(settings or {}, default=str)}
    save_file(tensors, os.path.join(path, STATE_FILE), metadata=meta)


def load_checkpoint(path, model, optimizer=None, device=None):
    """Loads adapters (or trainable parameters), the optimizer state and RNG states; returns
    (step, settings dict)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory holding {ADAPTER_FILE} and {STATE_FILE}")
    load_trainable_state_dict(model, load_file(os.path.join(path, ADAPTER_FILE)))
    from safetensors import safe_open

    state_path = os.path.join(path, STATE_FILE)
    with safe_open(state_path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(state_path)
    if optimizer is not None:
        state = {}
        for key, v in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"]), json.loads(meta["settings"])
