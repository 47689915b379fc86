"""Drop-in modules built on pyllmops' ops."""
from pyllmops.nn.nf4 import NF4Linear

__all__ = ["NF4Linear"]
