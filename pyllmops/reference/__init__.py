"""Pure-PyTorch implementations of every op: the test oracle, runnable in float64."""
from pyllmops.reference import nf4  # noqa: F401
from pyllmops.reference import attention  # noqa: F401
from pyllmops.reference import paged  # noqa: F401
from pyllmops.reference import lora  # noqa: F401
