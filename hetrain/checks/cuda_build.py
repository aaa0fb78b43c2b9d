"""``make cuda-build``: hetrain._C with its CUDA kernels and bindings, built against a CUDA torch without a GPU.

``make gpu-compile`` compiles the kernels alone (they include no torch header); this builds what ties
them to torch: the bindings, against the headers and libraries of the CUDA torch at hand. It builds out
of tree (``build/cuda``) so the CPU build in ``hetrain/`` stays as it is, then loads the library in a fresh
interpreter (every symbol resolved) and checks that each op a binding registers has a CUDA kernel and each
op with its autograd in C++ (csrc/autograd.cpp) its Autograd kernel.

Run it as a script with the CUDA torch's Python (``make cuda-build`` sets one up in ``.venv-cuda``): it
imports no hetrain module, since the in-tree ``hetrain/_C`` belongs to another torch.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__:
    from hetrain.checks.resources import cuobjdump
else:  # run as a script: this folder is on sys.path and the hetrain package stays unimported
    from resources import cuobjdump

ROOT = Path(__file__).resolve().parents[2]
_BOUND_OP = re.compile(r'm\.impl\(\s*"(\w+)"')
_DEFINED_OP = re.compile(r'm\.def\(\s*"(\w+)\(')
# Loads the built library alone (no hetrain import) and says, for each "op@DispatchKey", whether it has a kernel.
_PROBE = (
    "import json, sys, torch\n"
    "torch.ops.load_library(sys.argv[1])\n"
    "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
    "print(json.dumps({k: has('hetrain_C::' + k.split('@')[0], k.split('@')[1]) for k in sys.argv[2:]}))\n"
)


def bound_ops(root: Path = ROOT) -> list[str]:
    """The ops that ``csrc/cuda/*_binding.cpp`` register for CUDA tensors."""
    return sorted(op for f in (root / "csrc" / "cuda").glob("*_binding.cpp") for op in _BOUND_OP.findall(f.read_text()))


def differentiable_ops(root: Path = ROOT) -> list[str]:
    """The ops ``csrc/autograd.cpp`` defines with their autograd in C++ (registered under the Autograd key)."""
    return sorted(_DEFINED_OP.findall((root / "csrc" / "autograd.cpp").read_text()))


def cuda_home_fallback() -> dict[str, str]:
    """``{"CUDA_HOME": "/usr/local/cuda"}`` where torch's guess of the toolkit root lacks the runtime headers
    and that standard root has them, else nothing: torch guesses from nvcc's path, which a wrapper script
    on PATH (``/usr/local/bin/nvcc`` calling the real one) makes ``/usr/local``."""
    from torch.utils.cpp_extension import CUDA_HOME

    def has_headers(root: str | None) -> bool:
        return root is not None and Path(root, "include", "cuda_runtime.h").exists()

    if "CUDA_HOME" in os.environ or has_headers(CUDA_HOME) or not has_headers("/usr/local/cuda"):
        return {}
    return {"CUDA_HOME": "/usr/local/cuda"}


def build_env(arch: str) -> dict[str, str]:
    """The build's environment: CUDA required, one architecture, the toolkit root where torch's guess fails."""
    return {**os.environ, "HETRAIN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, **cuda_home_fallback()}


def build(out: Path, arch: str) -> tuple[bool, Path]:
    """Runs setup.py's build into ``out``, showing its progress; the log stays in ``out/build.log``."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "build.log"
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=build_env(arch), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            step = re.match(r"\[(\d+/\d+)\] \S+.* -c (?:-c )?(\S+)", line)
            if step:
                print(f"  [{step[1]}] {os.path.relpath(step[2], ROOT)}", flush=True)
            elif line.startswith("hetrain:"):
                print(line.rstrip(), flush=True)
    return proc.wait() == 0, log_path


def embedded_archs(library: Path) -> list[str]:
    """The GPU architectures whose code the library carries, from cuobjdump (empty without it)."""
    tool = cuobjdump()
    if tool is None:
        return []
    listing = subprocess.run([tool, "--list-elf", str(library)], capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.", listing)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build hetrain._C with CUDA against this CUDA torch, no GPU needed.")
    parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build (default 9.0, Hopper)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "cuda", help="build directory")
    args = parser.parse_args(argv)
    import torch

    if torch.version.cuda is None:
        print(f"hetrain cuda-build: torch {torch.__version__} is a CPU build, so there is nothing to link the CUDA "
              "bindings against.\n  Fix: run it with a CUDA build of torch: `make cuda-build` installs one into "
              ".venv-cuda.", file=sys.stderr)
        return 2
    print(f"hetrain cuda-build: torch {torch.__version__} (CUDA {torch.version.cuda}), arch {args.arch}, "
          f"into {os.path.relpath(args.out, ROOT)}")
    start = time.perf_counter()
    ok, log_path = build(args.out, args.arch)
    seconds = time.perf_counter() - start
    if not ok:
        print(f"hetrain cuda-build: the build failed after {seconds:.0f} s; its last lines "
              f"(whole log: {log_path}):", file=sys.stderr)
        print("".join(log_path.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        return 1
    library = Path(glob.glob(str(args.out / "lib" / "hetrain" / "_C*.so"))[0])
    # The C++ autograd is registered under the Autograd alias key, which covers AutogradCUDA.
    wanted = [f"{op}@CUDA" for op in bound_ops()] + [f"{op}@Autograd" for op in differentiable_ops()]
    probe = subprocess.run([sys.executable, "-c", _PROBE, str(library), *wanted], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"hetrain cuda-build: {library.name} was built but does not load:\n{probe.stderr}", file=sys.stderr)
        return 1
    registered = json.loads(probe.stdout.splitlines()[-1])
    width = max(len(k.split("@")[0]) for k in wanted)
    print(f"\n{'op'.ljust(width)}  {'kernel for'.ljust(12)}  registered")
    for k in wanted:
        op, key = k.split("@")
        print(f"{op.ljust(width)}  {key.ljust(12)}  {'yes' if registered[k] else 'NO'}")
    archs = embedded_archs(library)
    print(f"\nbuilt in {seconds:.0f} s: {os.path.relpath(library, ROOT)}, GPU code for {', '.join(archs) or '?'}")
    missing = [k.replace("@", " for ") for k in wanted if not registered[k]]
    if missing:
        print(f"hetrain cuda-build: no kernel registered: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
