"""Adapter-only checkpoints in safetensors, with the optimizer and step state to resume from; atomic, checksummed,
validated before anything is loaded.

Format (version 1) of one checkpoint, the directory <checkpoint_dir>/step-N/:

    adapter_model.safetensors   the adapters in peft's keys (pyllmops.nn.adapter_state_dict), plus every other
                                trainable parameter (e.g. a norm trained beside the adapters, or all of a model
                                without adapters) by its parameter name; metadata: format "pt", step
    trainer_state.safetensors   AdamW moments ("optimizer.<param index>.<name>"), RNG states ("rng.cpu",
                                "rng.cuda"); metadata: step, the optimizer's param_groups (JSON), the loop's
                                settings (JSON)
    manifest.json               {"format": "pyllmops-checkpoint", "version": 1, "step": N, "settings": {...},
                                 "files": {"<file name>": {"sha256": "<hex>", "bytes": <size>}, ...}}
                                written last; it lists every file of the checkpoint (other writers, e.g.
                                distributed shards, add their files to "files" and are verified the same way)

Writing (save_checkpoint) is atomic: the files go into a hidden sibling directory ".step-N.tmp-<pid>", each
fsync'ed, then the manifest, then the directory is fsync'ed and renamed to step-N, and the parent directory
fsync'ed. A kill at any point leaves either no step-N or a complete one; hidden temporary directories are
never read and the next save into the same checkpoint_dir removes them. A checkpoint is complete when
step-N/manifest.json exists; latest_checkpoint(checkpoint_dir) returns the complete step-N with the largest N
(resume_from="latest" in the loops).

Loading (load_checkpoint) first verifies everything and only then writes into the model, the optimizer and
the RNG: every listed file's size and sha256 (a bit flip, a truncated file, or a file copied from another
step is refused with a ValueError naming the file), each file's own step against the manifest's, the loop's
settings against the ones the checkpoint was written with (refused, naming each changed setting, unless
allow_settings_change=True), the tensor names, shapes and dtypes against the model's trainable parameters
and the optimizer's parameters.
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from pyllmops.nn.lora import _ADAPTERS, adapter_state_dict, load_adapter_state_dict

ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "trainer_state.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "pyllmops-checkpoint"
VERSION = 1
_PREFIX = "step-"


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


def _check_trainable_state_dict(model, sd, where):
    """Raises (before anything is written) unless sd has exactly the model's trainable tensors, shapes and dtypes."""
    want = trainable_state_dict(model)
    missing = sorted(set(want) - set(sd))
    unknown = sorted(set(sd) - set(want))
    if missing or unknown:
        raise KeyError(f"{where} does not match the model's trainable parameters: missing {missing[:8]}, "
                       f"unexpected {unknown[:8]}")
    for k, v in sorted(sd.items()):
        if v.shape != want[k].shape or v.dtype != want[k].dtype:
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(v.shape)} and dtype {v.dtype}, the model's "
                             f"has shape {tuple(want[k].shape)} and dtype {want[k].dtype}")


def load_trainable_state_dict(model, sd):
    """Loads what trainable_state_dict saved; checks all names, shapes and dtypes before writing any."""
    sd = dict(sd)
    _check_trainable_state_dict(model, sd, "state dict")
    if has_adapters(model):
        adapters = {k: sd.pop(k) for k in list(sd) if k.endswith((".lora_A.weight", ".lora_B.weight"))}
        load_adapter_state_dict(model, adapters)
    params = _other_trainable(model)
    with torch.no_grad():
        for n, v in sd.items():
            params[n].copy_(v)


# ---- atomic writing ----------------------------------------------------------------------------
def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_tensors(optimizer):
    osd = optimizer.state_dict()
    tensors = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optimizer.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
    return tensors, osd["param_groups"]


def _remove_stale_temporaries(parent):
    for name in os.listdir(parent):
        if name.startswith("." + _PREFIX) and (".tmp-" in name or ".old-" in name):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def save_checkpoint(path, model, optimizer, step, settings=None):
    """Writes the checkpoint of `step` atomically into directory `path` (see the module docstring): hidden
    temporary directory, fsync'ed files and manifest, rename. An existing checkpoint at `path` is replaced."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temporaries(parent)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    settings = json.loads(json.dumps(settings or {}, default=str))  # what a reader will see
    adapters = {k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()}
    state, param_groups = _optimizer_tensors(optimizer)
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    blobs = {
        ADAPTER_FILE: save_bytes(adapters, metadata={"format": "pt", "step": str(step)}),
        STATE_FILE: save_bytes(state, metadata={"step": str(step), "param_groups": json.dumps(param_groups),
                                                "settings": json.dumps(settings)}),
    }
    files = {}
    for fname, data in blobs.items():
        _write_file(os.path.join(tmp, fname), data)
        files[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "settings": settings, "files": files}
    _write_file(os.path.join(tmp, MANIFEST_FILE), json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    old = None
    if os.path.lexists(path):  # re-saving a step: move the old one aside (a kill now leaves no step-N)
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---- finding and verifying -------------------------------------------------------------------
def latest_checkpoint(checkpoint_dir):
    """The complete checkpoint (step-N directory with a manifest) with the largest N in checkpoint_dir, or None.
    Interrupted saves (hidden temporary directories, step-N without a manifest) are skipped."""
    if not os.path.isdir(checkpoint_dir):
        return None
    best = None
    for name in os.listdir(checkpoint_dir):
        if not name.startswith(_PREFIX) or not name[len(_PREFIX):].isdigit():
            continue
        full = os.path.join(checkpoint_dir, name)
        if os.path.isfile(os.path.join(full, MANIFEST_FILE)):
            n = int(name[len(_PREFIX):])
            if best is None or n > best[0]:
                best = (n, full)
    return None if best is None else best[1]


def read_manifest(path):
    """The manifest of checkpoint directory `path`, checked for format and fields (ValueError otherwise)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory holding {MANIFEST_FILE}, {ADAPTER_FILE} "
                         f"and {STATE_FILE}")
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise ValueError(f"checkpoint {os.fspath(path)!r} has no {MANIFEST_FILE}: it is not a complete checkpoint "
                         "(an interrupted save, or written by an older version); resume_from='latest' picks the "
                         "newest complete one")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {mpath!r} is not valid JSON ({e})") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("version") == VERSION
          and isinstance(manifest.get("step"), int) and not isinstance(manifest.get("step"), bool)
          and manifest["step"] >= 0 and isinstance(manifest.get("settings"), dict)
          and isinstance(manifest.get("files"), dict)
          and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
                  for v in manifest["files"].values()))
    if not ok:
        raise ValueError(f"checkpoint file {mpath!r} is not a {FORMAT} version {VERSION} manifest (format, "
                         "version, step, settings, files with sha256 and bytes)")
    for required in (ADAPTER_FILE, STATE_FILE):
        if required not in manifest["files"]:
            raise ValueError(f"checkpoint manifest {mpath!r} does not list {required}")
    return manifest


def _read_verified(path, fname, entry):
    """The bytes of a manifest-listed file, refused (ValueError naming the file) unless size and sha256 match."""
    fpath = os.path.join(path, fname)
    if os.path.basename(fname) != fname or not os.path.isfile(fpath):
        raise ValueError(f"checkpoint file {fpath!r} listed in the manifest is missing")
    with open(fpath, "rb") as f:
        data = f.read()
    if len(data) != entry["bytes"]:
        raise ValueError(f"checkpoint file {fpath!r} has {len(data)} bytes, the manifest says {entry['bytes']} "
                         "(truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(f"checkpoint file {fpath!r} is corrupt or not this checkpoint's: sha256 {digest[:16]}..., "
                         f"the manifest says {entry['sha256'][:16]}...")
    return data


def verify_checkpoint(path):
    """Checks the manifest and every listed file's size and sha256; returns the manifest (ValueError otherwise)."""
    manifest = read_manifest(path)
    for fname, entry in manifest["files"].items():
        _read_verified(path, fname, entry)
    return manifest


def _settings_changes(saved, current):
    keys = sorted(set(saved) | set(current))
    norm = json.loads(json.dumps(current, default=str))
    return [f"{k}: {saved.get(k, '<unset>')!r} -> {norm.get(k, '<unset>')!r}" for k in keys
            if saved.get(k, "<unset>") != norm.get(k, "<unset>")]


def _safetensors_from(path, fname, data):
    """(tensors, metadata) of a safetensors file's bytes; ValueError naming the file if it cannot be parsed."""
    try:
        tensors = load_bytes(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError)
        raise ValueError(f"checkpoint file {os.path.join(path, fname)!r} is not a valid safetensors file "
                         f"({e})") from None
    return tensors, meta


def load_checkpoint(path, model, optimizer=None, device=None, *, settings=None, allow_settings_change=False):
    """Loads adapters (or trainable parameters), the optimizer state and RNG states from checkpoint directory
    `path`; returns (step, the settings it was written with).

    Everything is verified before anything is written (see the module docstring): a corrupt, truncated or
    mismatched file is refused with a ValueError naming it. `settings`: the caller's loop settings; if they
    differ from the checkpoint's, ValueError naming each change unless allow_settings_change=True."""
    manifest = read_manifest(path)
    step = manifest["step"]
    loaded = {}
    for fname, entry in manifest["files"].items():
        data = _read_verified(path, fname, entry)
        if fname in (ADAPTER_FILE, STATE_FILE):
            loaded[fname] = _safetensors_from(path, fname, data)
    for fname, (_, meta) in loaded.items():
        if meta.get("step") != str(step):
            raise ValueError(f"checkpoint file {os.path.join(path, fname)!r} is from step {meta.get('step')}, the "
                             f"manifest says step {step}")
    adapters, _ = loaded[ADAPTER_FILE]
    tensors, meta = loaded[STATE_FILE]
    if settings is not None and not allow_settings_change:
        changes = _settings_changes(manifest["settings"], settings)
        if changes:
            raise ValueError(f"checkpoint {os.fspath(path)!r} was written with other loop settings "
                             f"({'; '.join(changes)}); "
                             "resuming would not continue the same run (e.g. steps changes the learning-rate "
                             "schedule); pass allow_settings_change=True to resume anyway")
    _check_trainable_state_dict(model, adapters, f"checkpoint file {os.path.join(path, ADAPTER_FILE)!r}")
    opt_state = None
    if optimizer is not None:
        opt_state = _optimizer_state(path, tensors, meta, optimizer, device)
    rng = tensors.get("rng.cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise ValueError(f"checkpoint file {os.path.join(path, STATE_FILE)!r} has no valid rng.cpu state")
    # ---- everything checked: now write ----
    load_trainable_state_dict(model, adapters)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    torch.set_rng_state(rng)
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step, manifest["settings"]


def _optimizer_state(path, tensors, meta, optimizer, device):
    """The optimizer state dict held in the state file, checked against `optimizer`'s parameters."""
    where = f"checkpoint file {os.path.join(path, STATE_FILE)!r}"
    try:
        groups = json.loads(meta["param_groups"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{where} has no valid param_groups metadata") from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if (not isinstance(groups, list) or len(groups) != len(optimizer.param_groups)
            or [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]):
        raise ValueError(f"{where} holds optimizer state for parameter groups of sizes "
                         f"{[len(g.get('params', ())) for g in groups] if isinstance(groups, list) else groups!r}, "
                         f"the optimizer has {[len(g['params']) for g in optimizer.param_groups]}")
    state = {}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            if not idx.isdigit() or int(idx) >= len(params):
                raise ValueError(f"{where}: {key!r} names no parameter of the optimizer ({len(params)} parameters)")
            p = params[int(idx)]
            if name != "step" and v.shape != p.shape:
                raise ValueError(f"{where}: {key!r} has shape {tuple(v.shape)}, the parameter has {tuple(p.shape)}")
            state.setdefault(int(idx), {})[name] = v.to(device) if name != "step" else v
    return {"state": state, "param_groups": groups}
