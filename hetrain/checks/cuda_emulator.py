"""The CUDA kernels of ``csrc/cuda`` built for the CPU emulator (``csrc/emu``) and called through ctypes.

Without a GPU the CPU tests check the kernels' per-element math (shared with the CPU kernels) and nvcc
checks that they compile; this runs the kernels themselves, so their indexing, block reductions, barriers,
grid-stride loops and partial-row workspaces are checked too. The sources are copied with each
``kernel<<<...>>>(args)`` launch rewritten into a call of the emulator, each ``__shared__`` array into a
function static the emulator fills with 0xFF bytes (NaN) for each block and each ``__launch_bounds__`` into a
check of the block's threads the kernel starts with, compiled with g++ (no CUDA; the
kernels without torch headers, as nvcc builds them) into one shared library, cached under ``build/cuda_emu``
by a hash of the sources. Beside a CPU build of hetrain._C, the library also holds the kernels' torch
bindings, registered for the CUDA dispatch key on CPU tensors (see :func:`load`).

What it cannot show: a thread runs on until it reaches a barrier (``__syncthreads``, a warp shuffle) or
returns, so a race between threads that no barrier separates (two threads' read-modify-write of one
location without an atomic, in one block) never interleaves and passes. Blocks run one at a time, in index
order or, in a shuffled run, in a random order: a race between blocks shows only where the result depends
on their order (a sum of blocks' values), as a difference between the two runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import numbers
import operator
import os
import re
import reprlib
import shutil
import subprocess
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_emu"
FLAGS = ["-std=c++20", "-O1", "-g", "-fPIC", "-Wall", "-Wno-unused-function"]
# The kernels (not torch's headers) run under UndefinedBehaviorSanitizer: an overflowing signed index, a bad
# shift or a misaligned access stops the kernel, its launch fails with a KernelFault naming the kernel's file
# and line, and the sanitizer's report of what it found is on stderr (csrc/emu/emulator.cpp,
# on_undefined_behaviour).
SANITIZE = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
LIBRARY = "libhetrain_cuda_emu.so"
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_IDENT = re.compile(r"[A-Za-z0-9_:]")
# `__shared__ T name[n][m];` on one line: (what precedes the name, the name, its dimensions).
_SHARED = re.compile(r"\b__shared__\b([^;\n]*?)\b([A-Za-z_]\w*)((?:\s*\[[^\]\n]*\])*)\s*;")
_BOUNDS = re.compile(r"\b__launch_bounds__\s*\(")
# A kernel's header, `__global__ void k(`, where its bound belongs: before or after `void`. Then the kernel's name,
# perhaps with template arguments (an explicit specialization's `k<float>`), and its parameters.
_GLOBAL = re.compile(r"\b__global__\s+")
_VOID = re.compile(r"\s*void\b\s*")
_KERNEL_NAME = re.compile(r"\s*[A-Za-z_]\w*\s*(?:<[^;{}]*?>\s*)?\(")
_BODY = re.compile(r"\s*[{;]")
# A preprocessor directive, with its continued lines.
_DIRECTIVE = re.compile(r"^[ \t]*#(?:\\\n|[^\n])*", re.M)
# Comments, string and character literals, and numbers (whose digit separators are no character literals).
_UNCODE = re.compile(r"""//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|\b\d[\w']*""", re.S)
# An entry point `int hetrain_emu_<name>(<parameters>) {` of csrc/emu/kernels.cpp or a test's kernels.
_ENTRY = re.compile(r"\bint\s+hetrain_emu_(\w+)\s*\(([^)]*)\)\s*\{")
# The entry points' C parameter types but pointers (which take a ctypes.c_void_p), without const.
_CTYPES: dict[str, type] = {
    "int": ctypes.c_int, "unsigned": ctypes.c_uint, "bool": ctypes.c_bool, "double": ctypes.c_double,
    "float": ctypes.c_float, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
}


class EmulatorBuildError(RuntimeError):
    """g++ could not build the emulated kernels; the message holds its output."""


class KernelFault(RuntimeError):
    """An emulated launch failed: bad arguments, an invalid launch, or a fault inside a kernel."""


def _callee_start(text: str, end: int) -> int:
    """Start of the kernel expression ending at ``end`` (an identifier, perhaps with template arguments)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and _IDENT.match(text[i - 1]):
        i -= 1
    return i


def rewrite_launches(text: str) -> str:
    """``k<T><<<g, b, s, st>>>(a, c)`` -> ``::hetrain_emu::launch(::hetrain_emu::Config(g, b, s, st), k<T>, a, c)``."""
    out: list[str] = []
    pos = 0
    while (open_at := text.find("<<<", pos)) >= 0:
        close_at = text.find(">>>", open_at)
        paren = close_at + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        if close_at < 0 or paren >= len(text) or text[paren] != "(":
            raise ValueError(f"a launch without arguments at offset {open_at}: {text[open_at:open_at + 60]!r}")
        start = _callee_start(text, open_at)
        callee = text[start:open_at].strip()
        config = text[open_at + 3:close_at]
        no_args = text[paren + 1:].lstrip().startswith(")")
        out.append(text[pos:start])
        out.append(f"::hetrain_emu::launch(::hetrain_emu::Config({config}), {callee}{'' if no_args else ', '}")
        # The newlines of the syntax dropped: every line stays where it was (see _named_as).
        out.append("\n" * (text.count("\n", start, open_at) - callee.count("\n") + text.count("\n", close_at, paren)))
        pos = paren + 1
    out.append(text[pos:])
    return "".join(out)


def rewrite_shared(text: str) -> str:
    """``__shared__ T a[n];`` -> ``static T a[n]; ::hetrain_emu::declare_shared(&a, sizeof a);`` (on the same line):
    a function static is one block's shared memory, as one block runs at a time, and the call fills it with
    0xFF bytes for each block (csrc/emu/cuda_runtime.h)."""

    def declare(m: re.Match[str]) -> str:
        if "," in m[1]:
            raise ValueError(f"declare one array per __shared__ declaration for the emulator: {m[0]!r}")
        return f"static{m[1]}{m[2]}{m[3]}; ::hetrain_emu::declare_shared(&{m[2]}, sizeof {m[2]});"

    return _SHARED.sub(declare, text)


def _closing(text: str, open_at: int) -> int:
    """Index of the parenthesis that closes the one at ``open_at``."""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"an unclosed parenthesis at offset {open_at}: {text[open_at:open_at + 60]!r}")


def _masked(text: str) -> str:
    """``text`` with its comments and string and character literals blanked (newlines kept): the same length, so
    an offset into it is one into ``text``."""

    def blank(m: re.Match[str]) -> str:
        return m[0] if m[0][0].isdigit() else re.sub(r"[^\n]", " ", m[0])

    return _UNCODE.sub(blank, text)


def _kernel_headers(code: str) -> dict[int, tuple[int, re.Match[str]]]:
    """The kernels' headers in ``code`` (masked) that hold a ``__launch_bounds__`` (before or after ``void``), each
    as the bound's offset: (the offset of the bound's closing parenthesis, the match of the kernel's ``{`` or, in a
    declaration, its ``;``)."""
    headers = {}
    for g in _GLOBAL.finditer(code):
        pos = g.end()
        before_void = _BOUNDS.match(code, pos) is not None
        if not before_void and (void := _VOID.match(code, pos)):
            pos = void.end()
        if not (bound := _BOUNDS.match(code, pos)):
            continue
        args_end = _closing(code, bound.end() - 1)
        name_at = args_end + 1
        if before_void:
            if not (void := _VOID.match(code, name_at)):
                continue
            name_at = void.end()
        if (name := _KERNEL_NAME.match(code, name_at)) and (
                body := _BODY.match(code, _closing(code, name.end() - 1) + 1)):
            headers[pos] = (args_end, body)
    return headers


def rewrite_launch_bounds(text: str) -> str:
    """``__global__ void __launch_bounds__(n, m) k(p) {`` -> ``__global__ void k(p) {
    ::hetrain_emu::check_launch_bounds(n, m);`` (on the same lines), as well for the bound before ``void`` and for
    a specialization ``k<float>(p)``: each thread checks its block against the kernel's bound first, so a launch of
    more threads fails as on a GPU (csrc/emu/cuda_runtime.h). A declaration without a body only loses its bound.
    One in a comment or a literal stays; one anywhere else (a macro's body) is refused, as it would check whatever
    function came next or none: ValueError naming its line. Preprocessor conditionals are not read: a bounded
    kernel in an ``#if 0`` block is rewritten like any other."""
    code = _masked(text)
    headers = _kernel_headers(code)
    directives = [d.span() for d in _DIRECTIVE.finditer(code)]
    out: list[str] = []
    pos = 0
    while m := _BOUNDS.search(code, pos):
        header = headers.get(m.start())
        if header is None or any(a <= m.start() < b for a, b in directives):
            line = text.count("\n", 0, m.start()) + 1
            raise ValueError(f"line {line}: __launch_bounds__ outside '__global__ void __launch_bounds__(...) "
                             f"kernel(parameters)' (or '__global__ __launch_bounds__(...) void kernel(...)'), the "
                             f"only places the emulator's build turns it into a check of the kernel's launches (in a "
                             f"macro or before another function it would check whatever came next); write it there: "
                             f"{text.splitlines()[line - 1].strip()!r}")
        args_end, body = header
        args = " ".join(code[m.end():args_end].split())
        out.append(text[pos:m.start()] + "\n" * text.count("\n", m.start(), args_end))
        if body[0].endswith("{"):
            out.append(f"{text[args_end + 1:body.end()]} ::hetrain_emu::check_launch_bounds({args});")
            pos = body.end()
        else:
            pos = args_end + 1
    out.append(text[pos:])
    return "".join(out)


def _kernel_source(text: str) -> str:
    """A kernel source's text as the emulator's build compiles it."""
    return rewrite_shared(rewrite_launch_bounds(rewrite_launches(text)))


def _rewritten(path: Path, rewrite: Callable[[str], str]) -> str:
    """``path``'s text rewritten; a source the rewrite refuses raises a ValueError naming the file."""
    try:
        return rewrite(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _named_as(path: Path, text: str) -> str:
    """``text``, a rewritten copy of ``path``, led by a ``#line`` naming ``path``: the compiler's messages, the
    sanitizer's reports and the debug info name the real file, not the copy in the build folder. The rewrites
    keep every line where it was."""
    quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'#line 1 "{quoted}"\n{text}'


def _sources() -> list[Path]:
    """Every file the emulated library is built from."""
    files = [*CSRC.glob("*.h"), *(CSRC / "cuda").glob("*.cu"), *(CSRC / "cuda").glob("*.cuh"),
             *(CSRC / "cuda").glob("*_kernel.h"), *(CSRC / "cuda").glob("rows.h"),
             *(f for f in (CSRC / "emu").rglob("*") if f.is_file())]
    return sorted(set(files))


def _digest(files: list[Path], compiler: str) -> str:
    h = hashlib.sha256(" ".join([compiler, *FLAGS, *SANITIZE]).encode())
    h.update(Path(__file__).read_bytes())  # how the sources are rewritten and built
    for f in files:
        h.update(str(f).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _compile(compiler: str, source: Path, obj: Path, src: Path, flags: Sequence[str] = ()) -> str:
    """Compiles one translation unit; g++'s output on failure, else empty."""
    # The emulator's stand-ins (src/emu) come first on the include path, before torch's headers.
    cmd = [compiler, *FLAGS, "-x", "c++", "-I", str(src / "emu"), "-I", str(src), *flags, "-include", "emulator.h",
           "-c", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return "" if proc.returncode == 0 else f"$ {' '.join(cmd)}\n{proc.stderr}"


def _torch_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags of a library built against this torch."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_flags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DHETRAIN_CUDA_EMULATOR",
                     *(f"-I{p}" for p in cpp_extension.include_paths())]
    lib = str(Path(torch.__file__).parent / "lib")
    return compile_flags, [f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]


def build(extra: Sequence[Path] = (), bindings: Path | None = None, out: Path = BUILD,
          compiler: str | None = None) -> Path:
    """The emulated kernels' shared library, built unless a build of the same sources is cached.

    ``extra``: more ``.cu`` files to build in (kernels that test the emulator itself); they may include
    the kernel headers as ``"cuda/<name>.h"``. ``bindings``: the file of hetrain._C; when given, the kernels'
    torch faces (``csrc/cuda/*_binding.cpp``) are built in too, against this torch and linked to that
    extension (whose argument checks they call): loading the library registers them for the CUDA dispatch
    key, where they take CPU tensors (``HETRAIN_CUDA_EMULATOR``, csrc/cuda/binding.h).
    """
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++") or "c++"
    files = _sources() + (sorted((CSRC / "cuda").glob("*_binding.cpp")) + [CSRC / "cuda" / "binding.h"]
                          if bindings else [])
    extra = [Path(e).resolve() for e in extra]
    salt = f"{torch.__version__} {Path(bindings).resolve()}" if bindings else ""
    target = out / _digest(files + extra, f"{compiler} {salt}")
    library = target / LIBRARY
    if library.exists():
        return library
    work = out / f"{target.name}.{os.getpid()}"  # built aside, then renamed: concurrent builds never mix
    try:
        _build_in(work, files, extra, bindings, compiler)
        try:
            work.rename(target)
        except OSError:  # another process finished the same build first
            pass
    finally:  # what a failed build left (some 16 MB), or the copy another process beat
        shutil.rmtree(work, ignore_errors=True)
    return library


def _build_in(work: Path, files: list[Path], extra: list[Path], bindings: Path | None, compiler: str) -> None:
    """Copies the sources into ``work`` (launches and shared arrays rewritten), compiles and links the library
    there."""
    src = work / "src"
    for f in files:
        dest = src / f.relative_to(CSRC)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.relative_to(CSRC).parts[0] == "emu":  # the emulator's own files are not kernels
            text = f.read_text()
        else:
            text = _rewritten(f, _kernel_source if f.suffix in (".cu", ".cuh") else rewrite_shared)
        dest.write_text(_named_as(f, text))
    for e in extra:
        (src / "extra").mkdir(exist_ok=True)
        (src / "extra" / e.name).write_text(_named_as(e, _rewritten(e, _kernel_source)))
    units = [(u, SANITIZE) for u in sorted((src / "cuda").glob("*.cu"))]
    units += [(src / "emu" / "emulator.cpp", ()), (src / "emu" / "kernels.cpp", ())]
    units += [(src / "extra" / e.name, SANITIZE) for e in extra]
    link_flags: list[str] = []
    if bindings:
        # One translation unit for every binding: torch's headers are parsed once.
        (src / "emu" / "bindings.cpp").write_text("".join(
            f'#include "cuda/{b.name}"\n' for b in sorted((src / "cuda").glob("*_binding.cpp"))))
        torch_compile, torch_link = _torch_flags()
        units.append((src / "emu" / "bindings.cpp", torch_compile))
        bound = Path(bindings).resolve()
        link_flags = [*torch_link, str(bound), f"-Wl,-rpath,{bound.parent}"]
    objs = [work / "obj" / f"{u.parent.name}_{u.stem}.o" for u, _ in units]
    objs[0].parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_compile, compiler, u, o, src, flags) for (u, flags), o in zip(units, objs, strict=True)]
        errors = [e for e in (j.result() for j in jobs) if e]
    if errors:
        raise EmulatorBuildError("building the emulated CUDA kernels failed:\n" + "\n".join(errors))
    link = subprocess.run([compiler, "-shared", *SANITIZE, "-o", str(work / LIBRARY), *map(str, objs), *link_flags],
                          capture_output=True, text=True)
    if link.returncode != 0:
        raise EmulatorBuildError(f"linking the emulated CUDA kernels failed:\n{link.stderr}")


class Emulator:
    """The emulated kernels' entry points (csrc/emu/kernels.cpp), called with tensors' data pointers."""

    def __init__(self, library: Path, bindings: bool = False):
        self.bindings = bindings  # the torch bindings are registered for the CUDA dispatch key
        if re.search(r"(^|:)halt_on_error=(1|true)", os.environ.get("UBSAN_OPTIONS", "")):
            # The sanitizer reads its options from the process's start (setting them here changes nothing); halting,
            # it stops inside its report, which the next undefined behaviour finds still open: the process then ends
            # without naming the test.
            warnings.warn("hetrain: UBSAN_OPTIONS has halt_on_error=1: the first undefined behaviour in an emulated "
                          "kernel fails its launch, a second ends the process without naming its test; start the "
                          "run without halt_on_error (-fno-sanitize-recover already stops each kernel at the first)",
                          stacklevel=2)
        self._lib = ctypes.CDLL(str(library))
        self._entries = _entry_points(Path(library).parent / "src")
        self._lib.hetrain_emu_error_message.restype = ctypes.c_char_p
        self._lib.hetrain_emu_set_shuffle_seed.argtypes = [ctypes.c_uint64]
        self._lib.hetrain_emu_launches.restype = ctypes.c_uint64
        self._lib.hetrain_emu_clear_error.restype = None

    @property
    def launches(self) -> int:
        """Kernel launches since the library was loaded."""
        return self._lib.hetrain_emu_launches()

    def shuffle_threads(self, seed: int) -> None:
        """Run a random runnable thread next, drawn from ``seed``; 0: the lowest-numbered one."""
        self._lib.hetrain_emu_set_shuffle_seed(seed)

    def call(self, entry: str, *args: object) -> None:
        """Calls ``hetrain_emu_<entry>``, each argument converted to its C parameter's type (as the entry's
        source declares it): tensors pass their data pointer (None a null one), a dtype its code, a sequence of
        ints an int64 array, an int where a double is declared that double, numpy scalars as Python ones; raises
        TypeError on an argument its parameter cannot take, KernelFault on an error."""
        params = self._entries.get(entry)
        if params is None:
            raise ValueError(f"no entry point hetrain_emu_{entry} in the emulated kernels' sources; the entries are "
                             f"{', '.join(sorted(self._entries))}")
        if len(args) != len(params):
            raise TypeError(f"{entry} takes {len(params)} arguments ({', '.join(d for d, _ in params)}), "
                            f"not {len(args)}")
        # Checked before converting: ctypes passes a tensor's data pointer to an integer parameter, an int to a
        # pointer one (which the kernel then dereferences), and truncates an int its C type cannot hold.
        for (decl, ctype), arg in zip(params, args, strict=True):
            if not _accepts(ctype, arg):
                raise TypeError(f"{entry}: the parameter '{decl}' cannot take the {type(arg).__name__} "
                                f"{reprlib.repr(arg)}; it takes {_TAKES.get(ctype, _TAKES[int])}")
        fn = getattr(self._lib, f"hetrain_emu_{entry}")
        fn.argtypes = [ctype for _, ctype in params]
        self._lib.hetrain_emu_clear_error()  # an error without a fault of this call's has no message
        err = fn(*[_value(ctype, a) for (_, ctype), a in zip(params, args, strict=True)])
        if err != 0:
            message = self._lib.hetrain_emu_error_message().decode() or "invalid arguments"
            raise KernelFault(f"{entry}: cudaError {err}: {message}")


def _entry_points(src: Path) -> dict[str, list[tuple[str, type]]]:
    """Each entry point's parameters (declaration, ctypes type), read from the library's copied sources under
    ``src`` (csrc/emu/kernels.cpp and the extra kernels): ctypes needs them to pass each argument as its C type
    (an int passed where a double is declared read as garbage)."""
    entries: dict[str, list[tuple[str, type]]] = {}
    for f in [src / "emu" / "kernels.cpp", *sorted((src / "extra").glob("*"))]:
        for m in _ENTRY.finditer(f.read_text()):
            params = []
            for decl in filter(None, (" ".join(p.split()) for p in m[2].split(","))):
                c_type = re.sub(r"\s*\b\w+$", "", decl).removeprefix("const ")
                if c_type.endswith("*"):
                    params.append((decl, ctypes.c_void_p))
                elif c_type in _CTYPES:
                    params.append((decl, _CTYPES[c_type]))
                else:
                    raise ValueError(f"hetrain_emu_{m[1]} ({f.name}): a parameter '{decl}' of a type the emulator "
                                     f"does not pass; add its ctypes type to _CTYPES")
            entries[m[1]] = params
    return entries


# What an entry's parameter of each ctypes type takes (int: the integer types), for the TypeError of a refusal.
_TAKES: dict[type, str] = {
    ctypes.c_void_p: "a contiguous CPU tensor, None or a sequence of int64 values",
    ctypes.c_float: "a real number (an int, a float or a numpy scalar) within float32's range (inf and nan pass)",
    ctypes.c_double: "a real number (an int, a float or a numpy scalar) within float64's range",
    ctypes.c_bool: "a bool, 0 or 1",
    int: "an int in its C type's range (a Python or numpy integer, or a bool), or a dtype (passed as its code)",
}


def _integer(value: object) -> int | None:
    """``value`` as an int where it is an integer (anything ``operator.index`` takes: an int, a bool, a numpy
    integer), else None. A tensor is none, even of one integer: at a scalar parameter it is a misplaced pointer."""
    if isinstance(value, torch.Tensor):
        return None
    try:
        return int(operator.index(value))
    except TypeError:
        return None


def _real(ctype: type, value: object) -> float | None:
    """``value`` as a float where it is a real number (not a bool) that ``ctype`` (c_float or c_double) holds, else
    None: a finite value float32 cannot hold would reach the kernel as inf."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        real = float(value)
    except OverflowError:  # an int beyond float64's range
        return None
    if ctype is ctypes.c_float and math.isfinite(real) and math.isinf(ctypes.c_float(real).value):
        return None
    return real


def _fits(ctype: type, value: object) -> bool:
    """Whether ``value`` is an integer the integer type ``ctype`` holds."""
    if (integer := _integer(value)) is None:
        return False
    if ctype is ctypes.c_bool:
        return integer in (0, 1)
    bits, signed = 8 * ctypes.sizeof(ctype), ctype(-1).value == -1
    return (-(1 << (bits - 1)) if signed else 0) <= integer < 1 << (bits - signed)


def _accepts(ctype: type, arg: object) -> bool:
    """Whether an entry's parameter of type ``ctype`` takes ``arg`` (as :func:`_value` converts it)."""
    if ctype is ctypes.c_void_p:
        return arg is None or isinstance(arg, torch.Tensor) or (
            isinstance(arg, (tuple, list)) and all(_fits(ctypes.c_int64, v) for v in arg))
    if ctype in (ctypes.c_float, ctypes.c_double):
        return _real(ctype, arg) is not None
    if isinstance(arg, torch.dtype):
        return arg in DTYPE_CODES and ctype is not ctypes.c_bool
    return _fits(ctype, arg)


def _value(ctype: type, arg: object) -> object:
    """``arg``, which the parameter of type ``ctype`` accepts, as ctypes passes it: numpy scalars as Python ones."""
    if isinstance(arg, torch.dtype):
        return DTYPE_CODES[arg]
    if isinstance(arg, torch.Tensor):
        if arg.device.type != "cpu" or not arg.is_contiguous():
            raise ValueError("the emulated kernels take contiguous CPU tensors")
        return arg.data_ptr()
    if isinstance(arg, (tuple, list)):
        return (ctypes.c_int64 * len(arg))(*map(_integer, arg))
    if arg is None:
        return None
    if ctype in (ctypes.c_float, ctypes.c_double):
        return _real(ctype, arg)
    return _integer(arg)


@cache
def load() -> Emulator:
    """The emulator for the current sources, built on first use. Where hetrain._C is built and holds no CUDA
    kernels of its own (a CPU build), the kernels' torch bindings are built in and registered for the CUDA
    dispatch key (:attr:`Emulator.bindings`): ``op.redispatch(DispatchKeySet(CUDA), ...)`` runs them on CPU
    tensors."""
    from hetrain import _ext

    ext = _ext.load()
    if ext is None or torch._C._dispatch_has_kernel_for_dispatch_key("hetrain_C::layer_norm_fwd", "CUDA"):
        return Emulator(build())
    library = build(bindings=Path(ext.__file__))
    torch.ops.load_library(str(library))
    return Emulator(library, bindings=True)
