"""Op families, each declared once with torch.library (schema, fake, kernels, autograd).

Importing a family module registers its ops under torch.ops.pyllmops.*.
"""
from pyllmops.ops import nf4  # noqa: F401
from pyllmops.ops import attention  # noqa: F401
from pyllmops.ops import paged  # noqa: F401
from pyllmops.ops import lora  # noqa: F401
