"""Compiles every Triton kernel of ``hetrain.ops.triton`` ahead of time for given architectures.

Kernels are found, not listed: every ``triton.JITFunction`` defined in a module of the package
must be covered by that module's ``aot_specs`` (see ``hetrain.ops.triton._aot``). Each spec is
compiled with ``triton.compile`` for a ``GPUTarget``, which needs no GPU; the cubin's resources come
from cuobjdump and its spills from Triton's own ptxas run, so nothing is compiled twice.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import pkgutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

from hetrain.checks import resources
from hetrain.checks.report import PartResult, Row
from hetrain.ops.triton._aot import AotSpec, BenchShapes

PACKAGE = "hetrain.ops.triton"
_FILE_MODULE = "hetrain_check_"  # prefix of the names given to modules loaded from a file path


def package_modules(package: str = PACKAGE) -> list[str]:
    """Dotted names of the package's modules, found by walking it."""
    pkg = importlib.import_module(package)
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg]


def load_module(ref: str) -> ModuleType:
    """A module by dotted name, or by the path of a ``.py`` file (for kernels kept outside the package)."""
    if not ref.endswith(".py"):
        return importlib.import_module(ref)
    path = Path(ref).resolve()
    # Named after the file's path, not its name alone: a/kernels.py and b/kernels.py are two modules.
    name = f"{_FILE_MODULE}{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {ref} as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def kernels_in(module: ModuleType) -> list[Any]:
    """The ``triton.JITFunction`` objects defined in ``module`` (not those it imports)."""
    from triton.runtime.jit import JITFunction

    return [v for v in vars(module).values() if isinstance(v, JITFunction) and v.fn.__module__ == module.__name__]


def _callees(kernel: Any) -> Iterator[Any]:
    """The JIT functions a kernel calls by a global name or ``module.name``, and theirs, recursively."""
    from triton.runtime.jit import JITFunction

    seen: set[int] = set()
    stack = [kernel]
    while stack:
        fn = stack.pop()
        scope = fn.fn.__globals__
        for node in ast.walk(ast.parse(fn.src)):
            if isinstance(node, ast.Name):
                value = scope.get(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                value = getattr(scope.get(node.value.id), node.attr, None)
            else:
                continue
            if isinstance(value, JITFunction) and id(value) not in seen:
                seen.add(id(value))
                stack.append(value)
                yield value


def uncovered(module: ModuleType, specs: list[AotSpec]) -> list[str]:
    """Kernels of ``module`` that no spec compiles, neither directly nor as a callee of a specified kernel."""
    covered = {id(s.kernel) for s in specs}
    for kernel in {id(s.kernel): s.kernel for s in specs}.values():
        covered.update(id(c) for c in _callees(kernel))
    return [k.__name__ for k in kernels_in(module) if id(k) not in covered]


def _config(spec: AotSpec, metadata: Any = None) -> str:
    """Constexprs, then warps and stages as compiled (as requested, where compiling failed)."""
    constexprs = " ".join(f"{k}={v}" for k, v in spec.constexprs.items())
    launch = metadata._asdict() if metadata is not None else spec.options
    warps_stages = " ".join(f"{tag}{launch[key]}" for key, tag in (("num_warps", "w"), ("num_stages", "s"))
                            if key in launch)
    return f"{constexprs} {warps_stages}".strip()


def kernel_name(kernel: Any) -> str:
    """``module.kernel`` as the table shows it: the module's last name, or the file's for one loaded from a path."""
    module = kernel.fn.__module__
    if module.startswith(_FILE_MODULE):  # without the path's hash
        module = module.removeprefix(_FILE_MODULE).rsplit("_", 1)[0]
    return f"{module.rsplit('.', 1)[-1]}.{kernel.__name__}"


def compile_spec(spec: AotSpec, arch: int, workdir: Path, tool: str) -> Row:
    """Compiles one spec for ``sm_<arch>`` and reads its resources; a compile error becomes the row's error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = kernel_name(spec.kernel)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # Triton prints ptxas's -v log here (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(
                ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs),
                target=GPUTarget("cuda", arch, 32), options=spec.options)
    except Exception as exc:  # any compile failure is a finding to report, not a crash of the check
        return Row(f"sm_{arch}", name, spec.dtype, _config(spec), spec.picked, error=f"{type(exc).__name__}: {exc}")
    cubin = workdir / f"{compiled.metadata.hash}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    row = Row(f"sm_{arch}", name, spec.dtype, _config(spec, compiled.metadata), spec.picked,
              spill=resources.spill_stores(log.getvalue()).get(spec.kernel.__name__))
    usage = resources.resource_usage(tool, cubin).get(spec.kernel.__name__)
    if usage is None:
        row.error = f"cuobjdump reported no resource usage for {spec.kernel.__name__}"
    else:
        row.regs, row.stack, row.smem = usage.regs, usage.stack + usage.local, usage.shared + compiled.metadata.shared
    return row


def compile_module(ref: str, arch: int, shapes: BenchShapes, tool: str) -> list[Row]:
    """Compiles every spec of one module for one architecture (a process-pool job)."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")  # a notice about a future default
    module = load_module(ref)
    with tempfile.TemporaryDirectory(prefix="hetrain-cubin-") as tmp:
        return [compile_spec(spec, arch, Path(tmp), tool) for spec in module.aot_specs(shapes)]


def run_jobs(jobs: list[tuple[Callable[..., Any], tuple]], workers: int) -> list[Any]:
    """Each job's ``fn(*args)`` run in ``workers`` spawned processes: its result, or the exception it raised.

    A job that kills its process (a crash inside the compiler, the OOM killer) breaks the whole pool: every job not
    finished by then fails with BrokenProcessPool. Those are run again, each in a process of its own, so that only
    the job that crashed fails so, and the others still give their results."""
    results = _run_in_pool(jobs, workers)
    lost = [i for i, result in enumerate(results) if isinstance(result, BrokenProcessPool)]
    if lost:
        with ThreadPoolExecutor(workers) as threads:
            for i, (result,) in zip(lost, threads.map(lambda i: _run_in_pool([jobs[i]], 1), lost), strict=True):
                results[i] = result
    return results


def _run_in_pool(jobs: list[tuple[Callable[..., Any], tuple]], workers: int) -> list[Any]:
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return [_result(f) for f in [pool.submit(fn, *args) for fn, args in jobs]]


def _result(future: Future) -> Any:
    try:
        return future.result()
    except Exception as exc:  # BrokenProcessPool included: one job's failure is its own, not the check's
        return exc


@contextlib.contextmanager
def _honest_compiles() -> Iterator[None]:
    """Every spec compiled afresh, with ptxas's log printed, in a cache that is deleted afterwards."""
    settings = {"TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    with tempfile.TemporaryDirectory(prefix="hetrain-triton-cache-") as cache:
        settings["TRITON_CACHE_DIR"] = cache
        saved = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def check(modules: list[str] | None, archs: tuple[int, ...], shapes: BenchShapes | None = None) -> PartResult:
    """Compiles the kernels of ``modules`` (default: every module of ``hetrain.ops.triton``) for ``archs``."""
    from hetrain.ops._backends import triton_interpreting

    if importlib.util.find_spec("triton") is None:
        return PartResult(skipped="triton is not installed")
    if triton_interpreting():
        return PartResult(problems=["TRITON_INTERPRET=1 turns @triton.jit kernels into interpreted functions, which "
                                    "cannot be compiled; run with it unset: env -u TRITON_INTERPRET python -m "
                                    "hetrain.checks.gpu_compile"])
    tool = resources.cuobjdump()
    if tool is None:
        return PartResult(problems=["cuobjdump not found (neither in the Triton wheel nor on PATH): cannot read "
                                    "registers and shared memory"])
    shapes = shapes or BenchShapes()
    start = time.perf_counter()
    result = PartResult()
    jobs = []
    for ref in modules if modules is not None else package_modules():
        try:
            module = load_module(ref)
        except Exception as exc:  # a module that cannot be imported cannot be checked: say which
            result.problems.append(f"{ref}: cannot be imported: {type(exc).__name__}: {exc}")
            continue
        kernels = kernels_in(module)
        if not kernels:
            continue
        try:
            specs = module.aot_specs(shapes) if hasattr(module, "aot_specs") else []
        except Exception as exc:  # a broken spec list is a finding like any other
            result.problems.append(f"{ref}: aot_specs raised {type(exc).__name__}: {exc}")
            continue
        for name in uncovered(module, specs):
            result.problems.append(f"{ref}: kernel {name} has no AotSpec: describe its compilations in the module's "
                                   "aot_specs(shapes) (see hetrain/ops/triton/_aot.py)")
        if specs:
            jobs += [(ref, arch) for arch in archs]
    with _honest_compiles():
        done = run_jobs([(compile_module, (ref, arch, shapes, tool)) for ref, arch in jobs],
                        max(1, min(len(jobs), os.cpu_count() or 1)))
    for (ref, arch), rows in zip(jobs, done, strict=True):
        if isinstance(rows, BrokenProcessPool):
            result.problems.append(f"{ref} for sm_{arch}: the process compiling it died (a crash inside Triton's "
                                   "compiler, or killed for memory); what it printed, if anything, is above")
        elif isinstance(rows, Exception):
            result.problems.append(f"{ref} for sm_{arch}: compiling raised {type(rows).__name__}: {rows}")
        else:
            result.rows += rows
    result.seconds = time.perf_counter() - start
    return result
