"""Builds hetrain._C from csrc/.

C++ sources are always built (-O3, OpenMP). CUDA sources (csrc/cuda/*.cu and their bindings
csrc/cuda/*_binding.cpp) are added when torch was built with CUDA and nvcc is found; set
HETRAIN_CUDA=1 to require them or HETRAIN_CUDA=0 to skip them. DEBUG=1 builds with -O0 -g.
C++ kernels are tuned for the building machine's CPU (-march=native, so AVX2/AVX-512 vectorise the
row loops); set HETRAIN_MARCH (e.g. x86-64-v3) to build for another machine.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a build without torch cannot proceed
    sys.exit(
        "hetrain: building hetrain._C needs torch installed first.\n"
        "  Fix: pip install torch==2.13.0   (or your CUDA build), then\n"
        "       pip install -e . --no-build-isolation"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _missing_cuda_toolkit() -> str | None:
    """Why the CUDA sources cannot be built here, or None when they can (no visible GPU is needed)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    if CUDA_HOME is None:
        return "nvcc was not found (no CUDA_HOME, no nvcc on PATH)"
    # torch guesses CUDA_HOME from nvcc's path; a wrapper script in /usr/local/bin makes that guess
    # /usr/local, whose include/ lacks the runtime headers the bindings need.
    if not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit root)"
    return None


def _want_cuda() -> bool:
    """CUDA sources need a CUDA build of torch and a complete toolkit, not a visible GPU."""
    forced = os.environ.get("HETRAIN_CUDA")
    if forced == "0":
        return False
    missing = _missing_cuda_toolkit()
    if missing is None:
        return True
    if forced == "1":
        sys.exit(
            f"hetrain: HETRAIN_CUDA=1 but {missing}.\n"
            "  Fix: install a CUDA build of torch and the CUDA toolkit (CUDA_HOME=/usr/local/cuda), "
            "or unset HETRAIN_CUDA."
        )
    if torch.version.cuda is not None:
        print(f"hetrain: WARNING: torch has CUDA but the CUDA kernels are skipped: {missing}")
    return False


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    march = os.environ.get("HETRAIN_MARCH", "native")
    # -fno-trapping-math: no kernel reads floating-point exception flags, and without it GCC keeps a branch for
    # every float compare-and-select (clamps, signs, dropout's keep), so those loops do not vectorise on
    # AVX2 (bias_gelu's ran 3.3x slower, dropout's 2.9x). Values are unchanged: it licenses no reassociation.
    # -fno-math-errno: no kernel reads errno either, and without it a sqrt keeps a branch to the library call
    # that would set it, so the loop around it does not vectorise (sparse_adamw's row update). Values unchanged.
    # No -std flag: torch's build helper passes the standard its own headers need (C++20 from torch 2.13 on,
    # C++17 before); csrc/ compiles under both.
    cxx = [*opt, "-fopenmp", f"-march={march}", "-fno-trapping-math", "-fno-math-errno"]
    link = ["-fopenmp"]
    if _want_cuda():
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cu += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        print(f"hetrain: building hetrain._C with CUDA ({len(cu)} CUDA-side sources)")
        return CUDAExtension(
            "hetrain._C",
            cpp + cu,
            extra_compile_args={"cxx": [*cxx, "-DHETRAIN_WITH_CUDA"], "nvcc": [*opt, "-lineinfo"]},
            extra_link_args=link,
        )
    print("hetrain: building hetrain._C for the CPU (no CUDA torch + nvcc, or HETRAIN_CUDA=0)")
    return CppExtension("hetrain._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)


class _ExplainingBuild(BuildExtension):
    """Turns a compiler failure into a message naming the step and the fix."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            sys.exit(
                f"hetrain: building the C++/CUDA extension hetrain._C failed: {exc}\n"
                "  Check: a C++20 compiler (g++ >= 10) for torch >= 2.13 (C++17, g++ >= 9, before) and, for CUDA,\n"
                "  an nvcc matching torch.version.cuda.\n"
                "  Retry with logs: DEBUG=1 pip install -e . --no-build-isolation -v\n"
                "  Or build for the CPU only: HETRAIN_CUDA=0 pip install -e . --no-build-isolation"
            )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _ExplainingBuild.with_options(use_ninja=shutil.which("ninja") is not None)},
)
