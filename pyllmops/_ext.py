"""Loads the compiled extension pyllmops._C on first use, with an actionable error if it is missing."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def lib():
    try:
        from pyllmops import _C
    except ImportError as e:  # pragma: no cover - exercised only on a broken install
        import pathlib

        import pyllmops

        here = pathlib.Path(pyllmops.__file__).resolve().parent
        if (here.parent / "setup.py").exists():  # imported from a source checkout that holds no build
            hint = (f"This pyllmops was imported from the source checkout {here.parent}, which has no build "
                    "of its own (Python puts the current directory first on the path, so it shadows a "
                    "`pip install .` copy). Build in place with `pip install -e .` there, or run from "
                    "another directory.")
        else:
            hint = "Reinstall with `pip install .` (a C++17 compiler and CMake are needed, nvcc optionally)."
        raise ImportError(f"pyllmops._C (the compiled kernels) could not be imported. {hint} "
                          f"Original error: {e}") from e
    return _C


@functools.lru_cache(maxsize=None)
def dtype_codes():
    """torch dtype -> the code _C uses (the table itself lives in C++: _C.DTYPES)."""
    names = lib().DTYPES
    return {getattr(torch, name): code for name, code in names.items()}


def build_info():
    """{'cpu': True, 'cuda': bool, 'cuda_archs': '80,90a', 'cuda_version': '13.0.88'}"""
    return dict(lib().build_info())
