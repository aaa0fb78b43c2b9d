"""Linear + cross-entropy forward+backward: eager (full logits), torch.compile and hetrain's chunked op."""

from __future__ import annotations

import torch

from benchmarks.cases import Case, dtype_name, liger
from hetrain.ops.linear_cross_entropy import bytes_per_row, chunk_rows, linear_cross_entropy


def _make(rows: int, hidden: int, vocab: int, dtype: torch.dtype, device: str):
    def make():
        x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = (torch.randn(vocab, hidden, dtype=dtype, device=device) * hidden**-0.5).requires_grad_()
        b = torch.zeros(vocab, dtype=dtype, device=device, requires_grad=True)
        t = torch.randint(0, vocab, (rows,), device=device)
        eager = lambda x, w, b: torch.nn.functional.cross_entropy(  # noqa: E731
            torch.nn.functional.linear(x, w, b).float(), t)
        compiled = torch.compile(eager)
        ours = lambda x, w, b: linear_cross_entropy(x, w, t, b)  # noqa: E731

        def step(fn):
            return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b))

        impls = {"eager": step(eager), "compile": step(compiled), "hetrain": step(ours)}
        liger_flce = liger("liger_fused_linear_cross_entropy", device)
        if liger_flce is not None:
            impls["liger"] = step(lambda x, w, b: liger_flce(x, w, t, b))
        return impls

    return make


def cpu_cases() -> list[Case]:
    rows, hidden, vocab = 2048, 768, 8192
    # The op is GEMM-bound (3 GEMMs, 6 * rows * hidden * vocab flops); bytes count hidden and weight read
    # in forward and their gradients written, the logits never leaving the chunk. bfloat16: what precision
    # auto picks on a CPU with bf16 dot products, where its GEMMs are several times faster than float32's.
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        chunk = chunk_rows(rows, vocab, hidden, dtype)
        notes = {
            "flops": f"{6 * rows * hidden * vocab:.3e}",
            "extra_memory": f"eager keeps {rows * vocab * 4 / 2**20:.0f} MiB of float32 logits (and as much again "
                            f"for their gradient); hetrain a chunk of {chunk} rows, "
                            f"{chunk * bytes_per_row(vocab, hidden, dtype) / 2**20:.0f} MiB",
        }
        cases.append(Case("linear_cross_entropy", f"{rows}x{hidden}->{vocab}", dtype_name(dtype),
                          _make(rows, hidden, vocab, dtype, "cpu"), 2 * (rows + vocab) * hidden * dtype.itemsize,
                          notes))
    return cases


def gpu_cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    rows, hidden, vocab = (256, 64, 1024) if quick else (16384, 768, 30522)
    dtype = torch.bfloat16
    return [Case("linear_cross_entropy", f"{rows}x{hidden}->{vocab}", dtype_name(dtype),
                 _make(rows, hidden, vocab, dtype, device), 2 * (rows + vocab) * hidden * dtype.itemsize,
                 {"flops": f"{6 * rows * hidden * vocab:.3e}"})]
