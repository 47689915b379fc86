"""Loads the compiled extension pyllmops._C on first use, with an actionable error if it is missing."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def lib():
    try:
        from pyllmops import _C
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            "pyllmops._C (the compiled kernels) could not be imported. Build it with "
            "`pip install -e .` (or `pip install .`) from the repository root; a C++17 compiler and "
            f"CMake are needed, nvcc optionally. Original error: {e}"
        ) from e
    return _C


@functools.lru_cache(maxsize=None)
def dtype_codes():
    """torch dtype -> the code _C uses (the table itself lives in C++: _C.DTYPES)."""
    names = lib().DTYPES
    return {getattr(torch, name): code for name, code in names.items()}


def build_info():
    """{'cpu': True, 'cuda': bool, 'cuda_archs': '80,90a', 'cuda_version': '13.0.88'}"""
    return dict(lib().build_info())
