"""Build pyllmops._C with CMake.

Environment:
  PYLLMOPS_CUDA        unset: build CUDA kernels when nvcc is found AND a CUDA driver is loadable
                       (libcuda.so.1 opens: a GPU machine), else the CPU kernels only; 0: never; 1: always
                       (nvcc required; CI uses it to compile and link the CUDA code without a GPU);
                       emu: the emulated CUDA backend (the .cu sources built by the host compiler and run on
                       the CPU, CPU tensors taking the CUDA path; docs/emulator.md). Needs the CUDA headers.
  PYLLMOPS_CUDA_ARCHS  ';'-separated list, default "80;90a" (a trailing 'a' selects arch-specific
                       features, e.g. wgmma on sm_90a).
  PYLLMOPS_BUILD_TYPE  CMake build type, default Release.
  MAX_JOBS             parallel compile jobs, default: all cores.
"""
import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _find_nvcc():
    cands = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    cands += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return next((c for c in cands if c and os.path.isfile(c)), None)


def _driver_loadable():
    """A CUDA driver can be loaded (libcuda.so.1 / nvcuda.dll): this machine can run CUDA kernels."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def cuda_mode():
    """(PYLLMOPS_CUDA value for CMake, why) from the environment and the machine (module docstring)."""
    env = os.environ.get("PYLLMOPS_CUDA", "").strip()
    if env:
        return env, f"PYLLMOPS_CUDA={env}"
    nvcc, driver = _find_nvcc(), _driver_loadable()
    if nvcc and driver:
        return "1", f"nvcc ({nvcc}) and a CUDA driver found"
    why = "no nvcc" if not nvcc else "nvcc found but no CUDA driver (libcuda.so.1) to run kernels"
    return "0", f"{why}: CPU kernels only (PYLLMOPS_CUDA=1 builds the CUDA kernels anyway)"


class _Progress:
    """Build output line by line to stdout, and to the terminal when pip captures stdout (pip shows a
    build's output only with -v): ninja's "[n/N] ..." lines show how far the build is."""

    def __init__(self):
        self.tty = None
        if not sys.stdout.isatty() and os.environ.get("PYLLMOPS_BUILD_QUIET") != "1":
            try:
                self.tty = open("/dev/tty", "w")
            except OSError:
                self.tty = None

    def say(self, line):
        print(line, flush=True)
        if self.tty is not None:
            self.tty.write(line + "\n")
            self.tty.flush()

    def run(self, cmd, cwd):
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            self.say("  " + line.rstrip())
        if proc.wait() != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("PYLLMOPS_BUILD_TYPE", "Release")
        mode, why = cuda_mode()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPYLLMOPS_CUDA={mode}",
            f"-DPYLLMOPS_CUDA_ARCHS={os.environ.get('PYLLMOPS_CUDA_ARCHS', '80;90a')}",
        ]
        if _has_ninja():
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        out = _Progress()
        out.say(f"pyllmops: building _C ({why}; {jobs} jobs, MAX_JOBS sets it)")
        t0 = time.time()
        out.run(["cmake", str(ROOT), *args], cwd=build_temp)
        out.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp)
        out.say(f"pyllmops: _C built in {time.time() - t0:.0f} s")


def _has_ninja():
    from shutil import which

    return which("ninja") is not None


setup(ext_modules=[CMakeExtension("pyllmops._C")], cmdclass={"build_ext": CMakeBuild})
