"""The package around the kernels: build info, the CLI."""
import subprocess
import sys

import pytest

import pyllmops


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pyllmops", *args], capture_output=True, text=True, timeout=120)


def test_build_info():
    info = pyllmops.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_version"]


def test_cli_info():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    assert f"pyllmops {pyllmops.__version__}" in r.stdout
    assert "backends compiled: cpu" in r.stdout and "GPUs visible to torch" in r.stdout


def test_cli_bench_unknown_family():
    r = _cli("bench", "nope")
    assert r.returncode != 0 and "unknown benchmark family 'nope'" in r.stderr


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_cli_usage_errors(argv):
    assert _cli(*argv).returncode == 2


def test_readme_examples_run():
    """The README's Python examples run as written (on CPU), so they stay true."""
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md block {i}", "exec"), {})


# ---- CPU threading (csrc/common/parallel.h) ------------------------------------------------------------
def test_cpu_threads_follow_torch(monkeypatch):
    """The CPU kernels use torch's thread count (one OpenMP pool) unless pyllmops is told otherwise."""
    import torch
    from pyllmops._ext import lib
    monkeypatch.delenv("PYLLMOPS_NUM_THREADS", raising=False)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lib().num_threads() == 1
        torch.set_num_threads(3)
        assert lib().num_threads() == 3
        lib().set_num_threads(2)
        assert lib().num_threads() == 2
        lib().set_num_threads(0)
        monkeypatch.setenv("PYLLMOPS_NUM_THREADS", "5")
        assert lib().num_threads() == 5
    finally:
        torch.set_num_threads(old)
        lib().set_num_threads(0)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_kernels_run_in_a_forked_child():
    """A child forked after the OpenMP pool ran (here: torch's matmul and our kernels) inherits none of its
    threads; our kernels there run on threads of their own instead of waiting forever for the pool, and
    give the parent's bytes."""
    import hashlib
    import os
    import time

    import torch
    from pyllmops._ext import lib
    w = torch.randn(512, 1024)
    x = torch.randn(4, 1024)
    (w @ w.T).sum()
    packed, state = pyllmops.quantize_nf4(w, 64, True)

    def digest(packed, y):  # a few bytes through the pipe (a pipe buffer holds only 64 KB)
        return hashlib.sha256(packed.numpy().tobytes() + y.numpy().tobytes()).digest()

    want = digest(packed, pyllmops.nf4_linear(x, packed, state))
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: torch's own ops need torch.set_num_threads(1) after a fork; ours need nothing
        try:
            os.close(rd)
            torch.set_num_threads(1)
            lib().set_num_threads(2)  # several chunks: the path that would wait for the parent's pool
            os.write(wr, digest(pyllmops.quantize_nf4(w, 64, True)[0], pyllmops.nf4_linear(x, packed, state)))
        finally:
            os._exit(0)
    os.close(wr)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("a pyllmops kernel hung in a forked child")
    with os.fdopen(rd, "rb") as f:
        assert f.read() == want
