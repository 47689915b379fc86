"""Shared test helpers: devices, poisoned outputs, relative error against float64 references."""
import pytest
import torch

from pyllmops.ops._common import poison_outputs

HAS_CUDA = torch.cuda.is_available()


def devices():
    """'cpu' always; 'cuda' (marked `cuda`) when a GPU is visible."""
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                      pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]))
    return out


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
