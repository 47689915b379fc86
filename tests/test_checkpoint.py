"""Checkpoints (pyllmops.train.checkpoint): atomic writes, resume_from="latest", manifest checksums, refusal of
corrupt, mismatched or foreign files and of changed loop settings, all before anything is written; and a run
killed (SIGKILL) at random points, mid-save included, that always resumes to the uninterrupted result.

Kill test profiles: quick (CI) 20 kills; PYLLMOPS_CHECKPOINT_KILLS=N for a longer one (e.g. 500)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import pyllmops
from pyllmops import train
from pyllmops.models import PROJECTIONS, Decoder, DecoderConfig
from pyllmops.train import checkpoint as ckpt

from train_fixtures import one_thread  # noqa: F401  (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = None


def data():
    global DATA
    if DATA is None:
        DATA = train.instruction_data()[:48]
    return DATA


def tiny_model(r=4):
    torch.manual_seed(7)
    model = Decoder(DecoderConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                  num_kv_heads=1, initializer_range=0.1))
    return pyllmops.apply_lora(model, r=r, alpha=8, target_modules=PROJECTIONS)


KW = dict(steps=6, batch_tokens=96, lr=5e-3, warmup_steps=2, seed=1, progress=False)


def run(model, **kw):
    return train.sft(model, data(), **{**KW, **kw})


def trainables(model):
    return {k: v.detach().clone() for k, v in ckpt.trainable_state_dict(model).items()}


def snapshot(model, optimizer=None):
    """Everything load_checkpoint may write: the model's tensors, the optimizer state, the RNG."""
    snap = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "rng": torch.get_rng_state()}
    if optimizer is not None:
        snap["opt"] = repr(optimizer.state_dict())
    return snap


def assert_unchanged(model, snap, optimizer=None):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap["model"][k]), f"{k} was written before the checkpoint was refused"
    assert torch.equal(torch.get_rng_state(), snap["rng"]), "the RNG was restored before the checkpoint was refused"
    if optimizer is not None:
        assert repr(optimizer.state_dict()) == snap["opt"], "the optimizer was loaded before the refusal"


def fresh_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 6-step run checkpointed at every step; the tests copy it before damaging anything."""
    root = tmp_path_factory.mktemp("ck")
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test here (train_fixtures.one_thread), so results are bitwise comparable
    try:
        model = tiny_model()
        run(model, checkpoint_dir=str(root), checkpoint_every=1)
    finally:
        torch.set_num_threads(old)
    return root, trainables(model)


def copy_of(saved, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(saved[0], dst)
    return dst


# ---------------------------------------------------------------- format, atomicity, latest
def test_layout_manifest_and_no_temporaries(saved):
    root, _ = saved
    assert sorted(os.listdir(root)) == [f"step-{i}" for i in range(1, 7)]  # no hidden temporaries left
    d = root / "step-4"
    assert sorted(os.listdir(d)) == sorted([ckpt.ADAPTER_FILE, ckpt.STATE_FILE, ckpt.MANIFEST_FILE])
    m = json.loads((d / ckpt.MANIFEST_FILE).read_text())
    assert m["format"] == "pyllmops-checkpoint" and m["version"] == 1 and m["step"] == 4
    assert m["settings"]["steps"] == 6 and m["settings"]["lr"] == 5e-3 and m["settings"]["world_size"] == 1
    import hashlib
    for fname in (ckpt.ADAPTER_FILE, ckpt.STATE_FILE):
        blob = (d / fname).read_bytes()
        assert m["files"][fname] == {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    assert ckpt.verify_checkpoint(str(d)) == m


def test_latest_skips_partial_checkpoints(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step-6")
    # what a kill can leave: a hidden temporary (mid-save), and a step-N without manifest (an older writer)
    (root / "step-6" / ckpt.MANIFEST_FILE).unlink()
    shutil.copytree(root / "step-5", root / ".step-7.tmp-123")
    (root / "step-9").mkdir()
    (root / "step-10x").mkdir()
    assert ckpt.latest_checkpoint(str(root)) == str(root / "step-5")
    assert ckpt.latest_checkpoint(str(tmp_path / "nothing")) is None
    with pytest.raises(ValueError, match="step-6.*has no manifest.json.*not a complete checkpoint"):
        ckpt.load_checkpoint(str(root / "step-6"), tiny_model())
    # the next save removes the stale temporaries
    model = tiny_model()
    ckpt.save_checkpoint(str(root / "step-8"), model, fresh_optimizer(model), 8, {})
    assert not [n for n in os.listdir(root) if n.startswith(".")]


def test_resume_latest_equals_uninterrupted(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    for n in (5, 6):
        shutil.rmtree(root / f"step-{n}")
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # must come from the checkpoint
    hist = run(model, checkpoint_dir=str(root), checkpoint_every=1, resume_from="latest")
    assert [r["step"] for r in hist] == [5, 6]
    for k, v in trainables(model).items():
        assert torch.equal(v, saved[1][k]), k
    # latest with nothing saved yet: a fresh start
    fresh = tiny_model()
    hist = run(fresh, checkpoint_dir=str(tmp_path / "empty"), resume_from="latest", steps=6)
    assert [r["step"] for r in hist] == list(range(1, 7))
    with pytest.raises(ValueError, match="resume_from='latest' needs checkpoint_dir"):
        run(tiny_model(), resume_from="latest")
    with pytest.raises(TypeError, match="resume_from must be None, 'latest' or a checkpoint directory path, got int"):
        run(tiny_model(), resume_from=3)


def test_resave_replaces_atomically(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    model = tiny_model()
    opt = fresh_optimizer(model)
    ckpt.save_checkpoint(str(root / "step-6"), model, opt, 6, {"x": 1})
    assert ckpt.verify_checkpoint(str(root / "step-6"))["settings"] == {"x": 1}
    assert not [n for n in os.listdir(root) if n.startswith(".")]


# ---------------------------------------------------------------- refusals, before any write
def flip_bit(path, rng):
    blob = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(blob[:8], "little")
    i = rng.randrange(header, len(blob))  # in the tensor data, where safetensors itself checks nothing
    blob[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(blob))
    return i


@pytest.mark.parametrize("fname", [ckpt.ADAPTER_FILE, ckpt.STATE_FILE])
def test_bit_flip_is_refused_naming_the_file(saved, tmp_path, fname):
    rng = random.Random(int(torch.randint(0, 2**31, ()).item()))
    root = copy_of(saved, tmp_path)
    for trial in range(6):
        d = tmp_path / f"flip{trial}"
        shutil.copytree(root / "step-3", d)
        pos = flip_bit(d / fname, rng)
        model = tiny_model()
        opt = fresh_optimizer(model)
        snap = snapshot(model, opt)
        with pytest.raises(ValueError, match=f"{fname}.* is corrupt or not this checkpoint's: sha256"):
            ckpt.load_checkpoint(str(d), model, opt)
        assert_unchanged(model, snap, opt), pos


def test_truncated_and_missing_files_are_refused(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    d = root / "step-3"
    blob = (d / ckpt.STATE_FILE).read_bytes()
    (d / ckpt.STATE_FILE).write_bytes(blob[:len(blob) // 2])
    model = tiny_model()
    opt = fresh_optimizer(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=f"{ckpt.STATE_FILE}.* has {len(blob) // 2} bytes, the manifest says"):
        ckpt.load_checkpoint(str(d), model, opt)
    (d / ckpt.STATE_FILE).unlink()  # the case: adapters were loaded before the missing state file failed
    with pytest.raises(ValueError, match=f"{ckpt.STATE_FILE}.* listed in the manifest is missing"):
        ckpt.load_checkpoint(str(d), model, opt)
    (d / ckpt.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json.* is not valid JSON"):
        ckpt.load_checkpoint(str(d), model, opt)
    (d / ckpt.MANIFEST_FILE).write_text(json.dumps({"format": "pyllmops-checkpoint", "version": 2}))
    with pytest.raises(ValueError, match="is not a pyllmops-checkpoint version 1 manifest"):
        ckpt.load_checkpoint(str(d), model, opt)
    assert_unchanged(model, snap, opt)


def test_file_from_another_step_is_refused(saved, tmp_path):
    """The adapter file of step 3 beside the state of step 6: the checksum catches it; and if someone also
    rewrote the manifest's checksum, the file's own step does."""
    root = copy_of(saved, tmp_path)
    d = root / "step-6"
    shutil.copy(root / "step-3" / ckpt.ADAPTER_FILE, d / ckpt.ADAPTER_FILE)
    model = tiny_model()
    opt = fresh_optimizer(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=f"step-6/{ckpt.ADAPTER_FILE}.* is corrupt or not this checkpoint's"):
        ckpt.load_checkpoint(str(d), model, opt)
    import hashlib
    m = json.loads((d / ckpt.MANIFEST_FILE).read_text())
    blob = (d / ckpt.ADAPTER_FILE).read_bytes()
    m["files"][ckpt.ADAPTER_FILE] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    (d / ckpt.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{ckpt.ADAPTER_FILE}.* is from step 3, the manifest says step 6"):
        ckpt.load_checkpoint(str(d), model, opt)
    assert_unchanged(model, snap, opt)


def test_changed_settings_are_refused_unless_allowed(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"other loop settings \(steps: 6 -> 8\).*allow_settings_change=True"):
        run(model, steps=8, resume_from=str(root / "step-3"))
    with pytest.raises(ValueError, match=r"lr: 0.005 -> 0.01; seed: 1 -> 2|lr: 0.005 -> 0.01.*seed: 1 -> 2"):
        run(model, lr=1e-2, seed=2, resume_from=str(root / "step-3"))
    with pytest.raises(ValueError, match=r"warmup_steps: 2 -> 3"):
        run(model, warmup_steps=3, resume_from=str(root / "step-3"))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match=r"step-6' is at step 6, beyond steps=4"):
        run(model, steps=4, resume_from=str(root / "step-6"), allow_settings_change=True)
    assert_unchanged(model, snap)
    hist = run(model, steps=8, resume_from=str(root / "step-3"), allow_settings_change=True)
    assert [r["step"] for r in hist] == [4, 5, 6, 7, 8]


def test_wrong_model_is_refused_before_writing(saved, tmp_path):
    root = copy_of(saved, tmp_path)
    model = tiny_model(r=8)  # other adapter shapes
    opt = fresh_optimizer(model)
    snap = snapshot(model, opt)
    with pytest.raises(ValueError,
                       match=r"down_proj.lora_A.weight' has shape \(4, 64\).*the model's has shape \(8, 64\)"):
        ckpt.load_checkpoint(str(root / "step-2"), model, opt)
    assert_unchanged(model, snap, opt)
    model2 = tiny_model()
    model2.norm.weight.requires_grad_(True)  # one trainable parameter more than was saved
    snap2 = snapshot(model2)
    with pytest.raises(KeyError, match=r"missing \['norm.weight'\]"):
        ckpt.load_checkpoint(str(root / "step-2"), model2)
    assert_unchanged(model2, snap2)
    model3 = tiny_model()
    opt3 = torch.optim.AdamW([p for p in model3.parameters() if p.requires_grad][:3], lr=1e-3)
    snap3 = snapshot(model3, opt3)
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[14\], the optimizer has \[3\]"):
        ckpt.load_checkpoint(str(root / "step-2"), model3, opt3)
    assert_unchanged(model3, snap3, opt3)


# ---------------------------------------------------------------- kills
def _server(steps, slow):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "checkpoint_worker.py"), str(steps),
                             str(slow)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _attempt(server, checkpoint_dir, out_file, kill_after=None):
    """One training attempt in a forked child; SIGKILL after kill_after seconds. (code, signal, seconds)."""
    server.stdin.write(f"run {checkpoint_dir} {out_file}\n")
    server.stdin.flush()
    line = server.stdout.readline().split()
    assert line and line[0] == "child", f"worker said {line!r}"
    if kill_after is not None:
        time.sleep(kill_after)
        try:
            os.kill(int(line[1]), signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had finished (and was reaped) already
    line = server.stdout.readline().split()
    assert line and line[0] == "exit", f"worker said {line!r}"
    return int(line[1]), int(line[2]), float(line[3])


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    """SIGKILL at uniformly random times over a checkpointed run's length (saves slowed by 10 ms per fsync, so
    that a good share of kills lands inside a save); each campaign kills until an attempt completes, then its
    final adapters must equal, bitwise, those of an uninterrupted run without checkpoints."""
    kills_wanted = int(os.environ.get("PYLLMOPS_CHECKPOINT_KILLS", "20"))
    steps = 8
    rng = random.Random(int(torch.randint(0, 2**31, ()).item()))
    server = _server(steps, 0.01)
    try:
        code, sig, _ = _attempt(server, "-", str(tmp_path / "reference"))
        assert (code, sig) == (0, 0), "the uninterrupted run failed"
        reference = load_file(str(tmp_path / "reference"))
        code, sig, full_time = _attempt(server, str(tmp_path / "timing"), str(tmp_path / "timing.out"))
        assert (code, sig) == (0, 0)
        kills = mid_save = campaigns = 0
        seen = set()
        while kills < kills_wanted:
            campaigns += 1
            ck, out = tmp_path / f"c{campaigns}", tmp_path / f"c{campaigns}.out"
            for tries in range(1000):
                code, sig, _ = _attempt(server, str(ck), str(out), kill_after=rng.uniform(0, full_time))
                if sig == signal.SIGKILL:
                    kills += 1
                    assert not out.exists()
                    if ck.exists():  # a kill inside a save leaves its own hidden temporary (named by pid)
                        new = {n for n in os.listdir(ck) if n.startswith(".step-")} - seen
                        mid_save += bool(new)
                        seen |= new
                    continue
                assert (code, sig) == (0, 0), f"campaign {campaigns}: attempt {tries} failed after a kill (exit {code})"
                break
            got = load_file(str(out))
            assert got.keys() == reference.keys()
            for k in reference:
                assert torch.equal(got[k], reference[k]), \
                    f"campaign {campaigns}: {k} differs from the uninterrupted run"
            shutil.rmtree(ck)
        # kills land mid-save with probability about (save time) / (run time), about a half here
        assert mid_save >= 1, f"none of {kills} kills landed inside a save: the test did not test that case"
        print(f"{kills} kills in {campaigns} campaigns, {mid_save} inside a save")
    finally:
        server.stdin.close()
        server.wait(timeout=60)
