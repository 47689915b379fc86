"""LoRA adapters on disk in peft's format: adapter_model.safetensors + adapter_config.json.

    pyllmops.save_adapter(model, "out/")                  # model: apply_lora'd (any base: dense, NF4, bnb 4-bit)
    peft_model = PeftModel.from_pretrained(base, "out/")  # peft loads it, same outputs
    pyllmops.load_adapter(model, "out/")                  # a directory saved by peft or by save_adapter

Tensor keys are peft's ('base_model.model.<module path>.lora_A.weight' / '.lora_B.weight'); the config
holds what peft's LoraConfig needs to rebuild the same layers (r, lora_alpha, target_modules as the full
module names, lora_dropout, use_rslora). QA-LoRA adapters have no peft equivalent and are refused.
"""
import json
import os

import torch

from pyllmops.nn.lora import (PEFT_PREFIX, LoRALinear, QALoRALinear, adapter_state_dict, apply_lora,
                              load_adapter_state_dict, match_target_modules)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _task_type(model):
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def adapter_config(model):
    """peft's LoraConfig fields (a dict) describing the model's LoRALinear adapters."""
    layers = _lora_layers(model)
    if any(isinstance(m, QALoRALinear) for m in model.modules()):
        raise ValueError("the model has QA-LoRA adapters, which peft cannot load; save them with "
                         "pyllmops.train.save_checkpoint instead")
    if not layers:
        raise ValueError("the model has no LoRA adapters (apply_lora(model, ...) first)")
    first = layers[0][1]
    for name, m in layers:
        if (m.r, m.alpha, m.dropout, m.use_rslora) != (first.r, first.alpha, first.dropout, first.use_rslora):
            raise ValueError(f"{name} has r={m.r}, alpha={m.alpha}, dropout={m.dropout}, use_rslora={m.use_rslora} "
                             f"but {layers[0][0]} has r={first.r}, alpha={first.alpha}, dropout={first.dropout}, "
                             f"use_rslora={first.use_rslora}: one adapter_config.json describes one setting")
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {"peft_type": "LORA", "task_type": _task_type(model), "r": first.r, "lora_alpha": first.alpha,
            "lora_dropout": first.dropout, "use_rslora": first.use_rslora, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted(n for n, _ in layers), "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base, "modules_to_save": None}


def save_adapter(model, path):
    """Writes the model's LoRA adapters to directory `path` as peft does (adapter_model.safetensors and
    adapter_config.json): PeftModel.from_pretrained(base_model, path) then gives the same outputs."""
    from safetensors.torch import save_file

    config = adapter_config(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return path


def _read(path):
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: load_adapter takes a directory written by peft's "
                                    f"save_pretrained or pyllmops.save_adapter")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(key):
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    return cfg, load_file(w_path)


def _expected_shapes(model, cfg, have_adapters):
    """{module path: (A shape, B shape)} the adapters of `model` (present, or about to be applied) have."""
    r = int(cfg["r"])
    if have_adapters:
        layers = _lora_layers(model)
    else:
        layers = match_target_modules(model, cfg["target_modules"])
    return {n: ((m.r if have_adapters else r, m.in_features), (m.out_features, m.r if have_adapters else r))
            for n, m in layers}


def load_adapter(model, path):
    """Loads a peft-format adapter directory into `model`. A model without adapters gets them first
    (apply_lora with the config's r, lora_alpha, target_modules, lora_dropout, use_rslora). The config,
    every key and every shape are checked before the model changes. Returns the model."""
    cfg, tensors = _read(path)
    have = bool(_lora_layers(model))
    expected = _expected_shapes(model, cfg, have)
    found = {}
    for k, v in tensors.items():
        key = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        for part, idx in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                mod = key[:-len(part)]
                if mod not in expected:
                    raise KeyError(f"{path}: {k} is for module {mod!r}, which the model "
                                   f"{'has no adapter on' if have else 'does not have as a target'}; adapters: "
                                   f"{sorted(expected)[:8]}")
                if tuple(v.shape) != expected[mod][idx]:
                    raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {expected[mod][idx]}")
                found[(mod, idx)] = True
                break
        else:
            raise KeyError(f"{path}: {k} is not a LoRA weight (lora_A / lora_B)")
    missing = sorted(m for m in expected for i in (0, 1) if (m, i) not in found)
    if missing:
        raise KeyError(f"{path} has no weights for {missing[:8]}")
    if not have:
        apply_lora(model, r=int(cfg["r"]), alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                   dropout=float(cfg.get("lora_dropout") or 0.0), use_rslora=bool(cfg.get("use_rslora", False)))
    with torch.no_grad():
        load_adapter_state_dict(model, tensors)
    return model
