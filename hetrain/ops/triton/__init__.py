"""Triton kernels, one module per op family; each exposes ``forward``/``backward`` launchers."""
