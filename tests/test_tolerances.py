"""The published tolerance table: every exported op measured, every error within what the op's tests allow."""

import math

import pytest
import torch

from hetrain.checks import tolerances
from hetrain.ops import _backends


def test_every_exported_op_has_a_builder_and_no_builder_is_stale():
    exported = tolerances.exported_ops()
    tolerances.check_builders(exported)
    assert sorted(tolerances.BUILDERS) == exported


def test_an_op_without_a_builder_fails_by_name():
    with pytest.raises(LookupError, match="no input builder for fused_new_op"):
        tolerances.measure(ops=["layer_norm", "fused_new_op"])


def test_tolerances_are_read_from_the_tests():
    from op_testing import TOLERANCES
    from test_rms_norm import TOL

    assert tolerances.allowed_error("layer_norm", torch.bfloat16) == TOLERANCES[torch.bfloat16]
    assert tolerances.allowed_error("rms_norm", torch.float16) == (TOL[torch.float16]["atol"],
                                                                    TOL[torch.float16]["rtol"])


@pytest.mark.parametrize("op", sorted(tolerances.BUILDERS))
def test_measured_errors_are_within_the_tests_tolerance(op):
    rows = tolerances.measure(ops=[op], device="cpu")
    backend_op = tolerances.BUILDERS[op](torch.float32, "cpu").backend_op
    expected = tolerances.backends_on(backend_op, "cpu")
    assert _backends.triton_interpreting() and ("triton" in expected) == (backend_op != "bn_relu_pool")
    assert [(r.backend, r.dtype) for r in rows] == [(b, d) for b in expected for d in tolerances.DTYPES]
    for r in rows:
        assert r.used <= 1, f"{op} {r.backend} {r.dtype}: {100 * r.used:.0f} % of the tests' allowed error"
        # Rounding to a half type shows: a measurement that reads 0 there would be measuring nothing.
        if r.dtype in (torch.bfloat16, torch.float16):
            assert r.out_abs + r.grad_abs > 0


def test_render_has_one_line_per_row_and_names_the_interpreter():
    rows = tolerances.measure(ops=["bias_gelu"], device="cpu", dtypes=(torch.float32,))
    text = tolerances.render(rows, "cpu", 1.0)
    assert "TRITON_INTERPRET=1" in text
    table = [line for line in text.splitlines() if line.startswith("| bias_gelu |")]
    assert [line.split(" | ")[1] for line in table] == [r.backend for r in rows]


class _NanGradient(torch.autograd.Function):
    """The identity, with a backward that returns NaN: a broken backend's gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_a_nan_gradient_counts_as_over_the_tolerance(monkeypatch):
    """A NaN gradient measured as within it: max() and `used <= 1` treat NaN as small."""
    builder = tolerances.BUILDERS["bias_gelu"]

    def nan_bias_gradient(dtype, device):
        case = builder(dtype, device)
        fn = case.fn
        case.fn = lambda x, bias: fn(x, _NanGradient.apply(bias))
        return case

    monkeypatch.setitem(tolerances.BUILDERS, "bias_gelu", nan_bias_gradient)
    row = tolerances.measure_case("bias_gelu", "cpu", torch.float32, "cpu")
    assert (row.grad_abs, row.grad_rel, row.grad_worst, row.used) == (math.inf, math.inf, "bias", math.inf), row
    assert row.out_abs < 1e-5  # the output is right
    assert tolerances.render([row], "cpu", 1.0).endswith("| inf % |\n")
