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
