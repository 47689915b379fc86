"""Build pyllmops._C with CMake.

Environment:
  PYLLMOPS_CUDA        unset: build CUDA kernels when nvcc is found; 0: never; 1: nvcc required;
                       emu: the emulated CUDA backend (the .cu sources built by the host compiler and run on
                       the CPU, CPU tensors taking the CUDA path; docs/emulator.md). Needs the CUDA headers.
  PYLLMOPS_CUDA_ARCHS  ';'-separated list, default "80;90a" (a trailing 'a' selects arch-specific
                       features, e.g. wgmma on sm_90a).
  PYLLMOPS_BUILD_TYPE  CMake build type, default Release.
  MAX_JOBS             parallel compile jobs, default: all cores.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("PYLLMOPS_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPYLLMOPS_CUDA={os.environ.get('PYLLMOPS_CUDA', 'AUTO')}",
            f"-DPYLLMOPS_CUDA_ARCHS={os.environ.get('PYLLMOPS_CUDA_ARCHS', '80;90a')}",
        ]
        if _has_ninja():
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


def _has_ninja():
    from shutil import which

    return which("ninja") is not None


setup(ext_modules=[CMakeExtension("pyllmops._C")], cmdclass={"build_ext": CMakeBuild})
