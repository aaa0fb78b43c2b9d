"""Checks that need no GPU: every kernel compiled ahead of time for Hopper and Ampere (``gpu_compile``)."""
