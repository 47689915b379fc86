"""Shared test helpers: devices, poisoned outputs, relative error against float64 references."""
import pytest
import torch

from pyllmops.ops._common import emulated, poison_outputs

# An emulated build (PYLLMOPS_CUDA=emu, docs/emulator.md) runs the CUDA kernels on CPU tensors: there
# the `cuda` tests use CPU tensors, and the CPU kernels (tested by a normal build) are not reachable.
EMULATED = emulated()
GPU = torch.cuda.is_available() and not EMULATED


class EmulatedCuda(str):
    """The `cuda` test device of an emulated build: torch reads the string "cpu" (tensors live on the CPU
    and take the CUDA kernels), while tests that branch on `device == "cuda"` / `device == "cpu"` see CUDA."""

    def __eq__(self, other):
        return other == "cuda" if type(other) is str else str.__eq__(self, other)

    def __ne__(self, other):
        return not self == other

    __hash__ = str.__hash__


CUDA = EmulatedCuda("cpu") if EMULATED else "cuda"   # the device of `cuda`-marked tests
HAS_CUDA = GPU or EMULATED
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU (and not an emulated build)")]
# What the emulator does not model: streams, CUDA graphs, the device allocator.
GPU_ONLY_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="needs a real GPU (streams, CUDA graphs)")]


def devices():
    """'cpu' (the CPU kernels) and 'cuda' (marked `cuda`; CPU tensors in an emulated build)."""
    cpu_marks = [pytest.mark.skipif(EMULATED, reason="emulated build: CPU tensors run the CUDA kernels")]
    return [pytest.param("cpu", id="cpu", marks=cpu_marks), pytest.param(CUDA, id="cuda", marks=CUDA_MARKS)]


def pytest_collection_modifyitems(config, items):
    """An emulated build runs the CUDA kernels on CPU tensors, so only the `cuda`-marked tests mean anything
    there (the CPU kernels, the models and the loops are tested by a normal build)."""
    if not EMULATED:
        return
    skip = pytest.mark.skip(reason="emulated build: only the cuda-marked tests run (build normally for the rest)")
    for item in items:
        if "cuda" not in item.keywords:
            item.add_marker(skip)


def sync():
    """Waits for the GPU (a no-op in an emulated build, whose launches return when done)."""
    if GPU:
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _poison():
    """Every kernel output starts as NaN (floats) or 0xA5 bytes, so an unwritten element fails."""
    with poison_outputs(True):
        yield


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs every run; a failing test prints its seed, and PYLLMOPS_TEST_SEED=N replays it."""
    import os

    seed = int(os.environ.get("PYLLMOPS_TEST_SEED", torch.seed() % (2 ** 31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (so NaN never passes)."""
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def assert_close(out, ref, tol, what="output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def pytest_runtest_makereport(item, call):
    """Prints the seed of a failing test so it can be replayed with PYLLMOPS_TEST_SEED."""
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[{item.nodeid}] PYLLMOPS_TEST_SEED={v}")
