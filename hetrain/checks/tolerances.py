"""Measures every fused op's largest error against its float64 reference, per backend and dtype; writes the table.

``python -m hetrain.checks.tolerances`` (``make tolerances``) writes ``docs/tolerances.md``. Each op is run on
seeded random inputs (never zeros) on every backend available on the device at hand and every dtype it
takes there; the reference is the op's ``*_ref`` function in float64 on the same (upcast) input values. The
allowed error shown beside each row is the one the op's own tests use, read from the test files
(``tests/op_testing.py``'s ``TOLERANCES`` unless the op's test module keeps its own table), so the tool
runs from a source checkout.

Without a GPU, Triton kernels can only run in Triton's interpreter on CPU tensors; that needs
``TRITON_INTERPRET=1`` before triton or hetrain is imported, and ``python -m`` imports hetrain before this
module runs, so :func:`main` starts itself again with it set.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from hetrain.device_info import cpu_model, device_name

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
DOC = ROOT / "docs" / "tolerances.md"
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Ops whose test module keeps its own tolerance table (module, attribute); the rest use op_testing's.
OWN_TABLES = {"rms_norm": ("test_rms_norm", "TOL")}


def _test_module(name: str) -> ModuleType:
    """A module of tests/ (op_testing's helpers and tables), loaded by path: tests/ is not a package."""
    path = TESTS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"hetrain.checks.tolerances: {path} not found; run it from a source checkout")
    if name not in sys.modules:
        if str(TESTS) not in sys.path:  # the test modules import op_testing by name
            sys.path.insert(0, str(TESTS))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def allowed_error(op: str, dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) the op's tests allow against the float64 reference for inputs of ``dtype``."""
    module, attr = OWN_TABLES.get(op, ("op_testing", "TOLERANCES"))
    entry = getattr(_test_module(module), attr)[dtype]
    return (entry["atol"], entry["rtol"]) if isinstance(entry, dict) else tuple(entry)


# --- one input builder per exported op -----------------------------------------------------------

@dataclass
class Case:
    """One call of an op: ``fn(*args)`` against ``ref(*args in float64)``.

    Tensors in ``args`` that require grad are differentiated; ``scaled`` names those whose gradient the
    op's tests compare relative to its largest entry (sums over rows, batch or vocab).
    """

    fn: Callable[..., torch.Tensor]
    args: dict[str, Any]
    ref: Callable[..., torch.Tensor]
    backend_op: str
    scaled: tuple[str, ...] = field(default=())


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int, grad: bool = True, **kw: float) -> torch.Tensor:
    return _test_module("op_testing").randn(*shape, dtype=dtype, seed=seed, **kw).to(device).requires_grad_(grad)


def _layer_norm(dtype, device):
    from hetrain.ops import layer_norm, layer_norm_ref
    x = _randn(64, 257, dtype=dtype, device=device, seed=1, scale=2.0, shift=0.5)
    w = _randn(257, dtype=dtype, device=device, seed=2, shift=1.0)
    b = _randn(257, dtype=dtype, device=device, seed=3)
    return Case(layer_norm, dict(x=x, weight=w, bias=b), layer_norm_ref, "layer_norm", ("weight", "bias"))


def _rms_norm(dtype, device):
    from hetrain.ops import rms_norm, rms_norm_ref
    x = _randn(64, 257, dtype=dtype, device=device, seed=1, shift=0.25)
    w = _randn(257, dtype=dtype, device=device, seed=2, scale=0.3, shift=1.0)
    return Case(rms_norm, dict(x=x, weight=w, eps=1e-6), rms_norm_ref, "rms_norm")


def _bias_gelu(dtype, device):
    from hetrain.ops import bias_gelu, bias_gelu_ref
    x = _randn(64, 257, dtype=dtype, device=device, seed=1, scale=2.0, shift=0.3)
    b = _randn(257, dtype=dtype, device=device, seed=2)
    return Case(bias_gelu, dict(x=x, bias=b), bias_gelu_ref, "bias_gelu", ("bias",))


def _dropout_add_layer_norm(dtype, device):
    from hetrain.ops import dropout_add_layer_norm, dropout_add_layer_norm_ref
    x = _randn(64, 257, dtype=dtype, device=device, seed=1, scale=2.0, shift=0.5)
    r = _randn(64, 257, dtype=dtype, device=device, seed=2)
    w = _randn(257, dtype=dtype, device=device, seed=3, shift=1.0)
    b = _randn(257, dtype=dtype, device=device, seed=4)
    # p = 0: the output is deterministic, and the reference needs no mask.
    args = dict(x=x, residual=r, weight=w, bias=b, p=0.0)
    return Case(dropout_add_layer_norm, args, lambda x, r, w, b, p: dropout_add_layer_norm_ref(x, r, w, b, None, p),
                "dropout_add_layer_norm", ("weight", "bias"))


def _dropout(dtype, device):
    from hetrain.ops.dropout import dropout, dropout_ref, keep_mask
    x = _randn(64, 257, dtype=dtype, device=device, seed=1, scale=2.0, shift=0.3)

    def fn(x, p):
        torch.manual_seed(0)  # the op draws its seed with one torch.randint: the reference draws the same
        return dropout(x, p)

    def ref(x, p):
        torch.manual_seed(0)
        return dropout_ref(x, keep_mask(int(torch.randint(2**31, (1,)).item()), x.shape, p, x.device), p)

    return Case(fn, dict(x=x, p=0.3), ref, "dropout")


def _linear_cross_entropy(dtype, device):
    from hetrain.ops import linear_cross_entropy, linear_cross_entropy_ref
    from hetrain.ops.linear_cross_entropy import bytes_per_row
    rows, hidden_size, vocab = 66, 32, 101
    g = torch.Generator().manual_seed(4)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[torch.randperm(rows, generator=g)[:5]] = -100
    args = dict(hidden=_randn(rows, hidden_size, dtype=dtype, device=device, seed=1, shift=0.1),
                weight=_randn(vocab, hidden_size, dtype=dtype, device=device, seed=2, scale=0.4),
                target=target.to(device), bias=_randn(vocab, dtype=dtype, device=device, seed=3))
    budget = 24 * bytes_per_row(vocab, hidden_size, dtype)  # three chunks, the last short

    def fn(hidden, weight, target, bias):
        return linear_cross_entropy(hidden, weight, target, bias, memory_budget=budget)

    return Case(fn, args, linear_cross_entropy_ref, "linear_cross_entropy", ("hidden", "weight", "bias"))


def _conv_args(dtype, device, bn: bool) -> dict[str, Any]:
    # Before batch-statistics BatchNorm the conv bias cancels out (its gradient is zero): none there.
    args = dict(x=_randn(2, 3, 11, 13, dtype=dtype, device=device, seed=1, shift=0.3),
                conv_weight=_randn(5, 3, 3, 3, dtype=dtype, device=device, seed=2, scale=0.5),
                conv_bias=None if bn else _randn(5, dtype=dtype, device=device, seed=3))
    if bn:  # training with batch statistics and no running buffers: nothing is mutated between runs
        args.update(bn_weight=_randn(5, dtype=dtype, device=device, seed=4, shift=1.0),
                    bn_bias=_randn(5, dtype=dtype, device=device, seed=5), running_mean=None, running_var=None,
                    training=True)
    return args


def _conv_bn_relu_pool(dtype, device):
    from hetrain.ops import conv_bn_relu_pool
    from hetrain.ops.conv_bn_relu_pool import bn_relu_pool_ref

    def ref(x, cw, cb, w, b, rm, rv, training):
        return bn_relu_pool_ref(torch.nn.functional.conv2d(x, cw, cb), w, b, rm, rv, training, kernel_size=3,
                                stride=2, padding=1)

    return Case(lambda *a: conv_bn_relu_pool(*a, kernel_size=3, stride=2, padding=1), _conv_args(dtype, device, True),
                ref, "bn_relu_pool", ("x", "conv_weight", "bn_weight", "bn_bias"))


def _conv_relu_pool(dtype, device):
    from hetrain.ops import conv_relu_pool, relu_pool_ref
    return Case(conv_relu_pool, _conv_args(dtype, device, False),
                lambda x, cw, cb: relu_pool_ref(torch.nn.functional.conv2d(x, cw, cb)), "bn_relu_pool",
                ("x", "conv_weight", "conv_bias"))


def _bn_relu_pool(dtype, device):
    from hetrain.ops import bn_relu_pool, bn_relu_pool_ref
    args = dict(x=_randn(2, 5, 9, 11, dtype=dtype, device=device, seed=1, scale=2.0, shift=0.3),
                weight=_randn(5, dtype=dtype, device=device, seed=2, shift=1.0),
                bias=_randn(5, dtype=dtype, device=device, seed=3), running_mean=None, running_var=None,
                training=True)
    return Case(lambda *a: bn_relu_pool(*a, kernel_size=3, stride=2, padding=1), args,
                lambda *a: bn_relu_pool_ref(*a, kernel_size=3, stride=2, padding=1), "bn_relu_pool",
                ("x", "weight", "bias"))


def _relu_pool(dtype, device):
    from hetrain.ops import relu_pool, relu_pool_ref
    x = _randn(2, 5, 9, 11, dtype=dtype, device=device, seed=1, shift=0.3)
    return Case(lambda x: relu_pool(x, 3, 2, 1), dict(x=x), lambda x: relu_pool_ref(x, 3, 2, 1), "bn_relu_pool")


BUILDERS: dict[str, Callable[[torch.dtype, str], Case]] = {
    "layer_norm": _layer_norm, "rms_norm": _rms_norm, "bias_gelu": _bias_gelu,
    "dropout_add_layer_norm": _dropout_add_layer_norm, "linear_cross_entropy": _linear_cross_entropy,
    "conv_bn_relu_pool": _conv_bn_relu_pool, "conv_relu_pool": _conv_relu_pool, "bn_relu_pool": _bn_relu_pool,
    "relu_pool": _relu_pool, "dropout": _dropout,
}


def exported_ops() -> list[str]:
    """The ops ``hetrain.ops`` exports (every public name but the ``*_ref`` references)."""
    import hetrain.ops
    return sorted(name for name in hetrain.ops.__all__ if not name.endswith("_ref"))


def check_builders(ops: list[str]) -> None:
    """Refuses to publish a table that silently leaves an op out."""
    missing = [op for op in ops if op not in BUILDERS]
    if missing:
        raise LookupError(f"hetrain.checks.tolerances: no input builder for {', '.join(missing)}; add one to BUILDERS")


# --- measurement ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """Largest errors of one (op, backend, dtype) against float64; ``used`` is the worst error / allowed error."""

    op: str
    backend: str
    dtype: torch.dtype
    out_abs: float
    out_rel: float
    grad_abs: float
    grad_rel: float
    grad_worst: str
    atol: float
    rtol: float
    used: float


def _run(fn: Callable, args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, the upstream gradient used, and the gradient of each input that requires one."""
    wanted = {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    y = fn(*args.values())
    dy = _test_module("op_testing").randn(y.numel(), dtype=y.dtype, seed=7).to(y.device).view(y.shape)
    return y, dy, dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), dy), strict=True))


def _errors(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, scale: float = 1.0):
    """Max abs error, it relative to the largest reference entry, and the worst error / what assert_close allows.

    A NaN error (a NaN output or gradient) counts as an infinite one: NaN compares as neither large nor small,
    so ``max`` and ``used <= 1`` would pass it."""
    diff = ((got.double() - want) / scale).abs()
    diff = diff.masked_fill(diff.isnan(), float("inf"))
    abs_err = diff.max().item()
    allowed = atol + rtol * (want / scale).abs()
    largest = want.abs().max().item()
    return abs_err, abs_err * scale / largest if largest else abs_err, (diff / allowed).max().item()


def measure_case(op: str, backend: str, dtype: torch.dtype, device: str) -> Row:
    """The op on ``backend`` in ``dtype`` against its reference in float64 on the same input values."""
    from hetrain import plugins
    case = BUILDERS[op](dtype, device)
    with plugins.use_backend(**{case.backend_op: backend}):
        y, dy, grads = _run(case.fn, case.args)
    args64 = {k: v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
              and v.is_floating_point() else v for k, v in case.args.items()}
    y64 = case.ref(*args64.values())
    grads64 = torch.autograd.grad(y64, [args64[k] for k in grads], dy.double())
    atol, rtol = allowed_error(op, dtype)
    out_abs, out_rel, used = _errors(y.detach(), y64.detach(), atol, rtol)
    grad_abs, grad_rel, worst = 0.0, 0.0, "-"
    for name, g64 in zip(grads, grads64, strict=True):
        scale = (g64.abs().max().item() or 1.0) if name in case.scaled else 1.0
        g_abs, g_rel, g_used = _errors(grads[name], g64, atol, rtol, scale)
        if g_abs >= grad_abs:
            grad_abs, worst = g_abs, name
        grad_rel, used = max(grad_rel, g_rel), max(used, g_used)
    return Row(op, backend, dtype, out_abs, out_rel, grad_abs, grad_rel, worst, atol, rtol, used)


def backends_on(op: str, device: str) -> list[str]:
    """Backends of ``op``'s registry entry that can run on ``device`` here, best first."""
    from hetrain import plugins
    return [b.name for b in plugins.backends(op)
            if b.serves(torch.device(device).type) and b.why_unavailable() is None]


def measure(ops: list[str] | None = None, device: str | None = None,
            dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[Row]:
    """One row per op, available backend and dtype; every exported op must have a builder."""
    ops = exported_ops() if ops is None else ops
    check_builders(ops)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return [measure_case(op, backend, dtype, device) for op in ops
            for backend in backends_on(BUILDERS[op](torch.float32, device).backend_op, device) for dtype in dtypes]


# --- the document --------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def render(rows: list[Row], device: str, seconds: float) -> str:
    """docs/tolerances.md: how the numbers were measured, on what, and the table."""
    where = device_name(device) if device == "cuda" else f"CPU ({cpu_model()})"
    interpreted = ("Triton kernels ran in Triton's interpreter on CPU tensors (`TRITON_INTERPRET=1`), so their "
                   "numbers check the kernels' arithmetic, not a GPU's. The interpreter casts float32 to bfloat16 by "
                   "truncation, where a GPU rounds to nearest, so the Triton bfloat16 rows run up to about twice the "
                   "C++ kernels'.")
    triton = (interpreted if os.environ.get("TRITON_INTERPRET") == "1" else "Triton kernels ran compiled on the GPU.")
    lines = [
        "# Measured tolerances of the fused ops",
        "",
        "Generated by `make tolerances` (`python -m hetrain.checks.tolerances`); do not edit by hand.",
        "",
        "Each op runs forward and backward on seeded random inputs (never zeros; 64 x 257 for the row ops, "
        "66 rows x vocab 101 for `linear_cross_entropy`, small NCHW inputs for the pooling ops; dropout at "
        "p = 0 for `dropout_add_layer_norm`, p = 0.3 against the same mask for `dropout`) on every backend "
        "available here and every dtype. The reference is the op's `*_ref` function in "
        "float64 on the same input values, upcast, with the same upstream gradient. Columns:",
        "",
        "- *out abs*: largest absolute error of the output; *out rel*: that over the largest reference entry;",
        "- *grad abs*: largest absolute error over the input gradients, named by the worst input; gradients "
        "that are sums over rows, batch or vocab are divided by their largest entry, as the op's tests "
        "compare them; *grad rel*: the largest gradient error over that gradient's largest entry;",
        "- *test atol / rtol*: what the op's tests allow for that dtype (`tests/op_testing.py` `TOLERANCES`, or "
        "the op's own table); *used*: the worst element's error over the error allowed there "
        "(`atol + rtol * |ref|`), in percent; the tests fail above 100 %.",
        "",
        f"Device: {where}. {triton} torch {torch.__version__}, triton {_version('triton')}, hetrain "
        f"{_version('hetrain')}, Python {platform.python_version()}. Measured on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d} in {seconds:.0f} s.",
        "",
        "| op | backend | dtype | out abs | out rel | grad abs (worst input) | grad rel | test atol / rtol | used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.op} | {r.backend} | {str(r.dtype).removeprefix('torch.')} | {r.out_abs:.2e} | "
                     f"{r.out_rel:.2e} | {r.grad_abs:.2e} ({r.grad_worst}) | {r.grad_rel:.2e} | "
                     f"{r.atol:.0e} / {r.rtol:.0e} | {100 * r.used:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description=f"Measure each fused op's error against float64 on every backend "
                                                 f"and dtype available here, and write {DOC.relative_to(ROOT)}.")
    parser.parse_args(argv)  # --help, and a refusal of arguments it has none of, before minutes of measuring
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # hetrain (and triton) are already imported without the interpreter: start again with it.
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    start = time.perf_counter()
    rows = measure(device=device)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(rows, device, time.perf_counter() - start))
    over = [r for r in rows if not r.used <= 1]  # a NaN is over too
    print(f"wrote {DOC} ({len(rows)} rows); {len(over)} over the tests' tolerance")
    for r in over:
        print(f"  {r.op} {r.backend} {r.dtype}: {100 * r.used:.0f} % of the allowed error")


if __name__ == "__main__":
    main()
