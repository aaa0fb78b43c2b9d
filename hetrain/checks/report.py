"""The findings of a compile check: one row per kernel, dtype, configuration and architecture."""

from __future__ import annotations

from dataclasses import dataclass, field

COLUMNS = ("arch", "kernel", "dtype", "config", "regs", "spill", "stack", "smem", "picked")


@dataclass
class Row:
    """One compiled (or failed) kernel. ``spill`` is ptxas's spill stores in bytes per thread, ``stack`` the
    stack frame (spills plus call frames), ``smem`` static plus launch-time shared memory in bytes."""

    arch: str
    kernel: str
    dtype: str
    config: str
    picked: bool
    regs: int | None = None
    spill: int | None = None
    stack: int | None = None
    smem: int | None = None
    error: str | None = None

    def problem(self) -> str | None:
        """Why this row fails the check: a compile error, or spills where the launcher picks the configuration."""
        where = f"{self.arch} {self.kernel} [{self.dtype} {self.config}]"
        if self.error is not None:
            return f"{where} does not compile:\n{self.error}"
        if self.spill is None:
            return f"{where}: ptxas's log gave no spill count, so spills cannot be ruled out"
        if self.picked and self.spill:
            return f"{where} spills {self.spill} bytes per thread in a configuration the launcher picks"
        return None


@dataclass
class PartResult:
    """One part of the check (triton or cuda): its rows, failures beyond the rows, or why it was skipped."""

    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    def all_problems(self) -> list[str]:
        return self.problems + [p for p in (r.problem() for r in self.rows) if p is not None]


def format_table(rows: list[Row]) -> str:
    """A fixed-width table of the rows; failed compilations show ``ERROR`` in place of resources."""

    def cells(r: Row) -> list[str]:
        usage = [r.regs, r.spill, r.stack, r.smem] if r.error is None else ["ERROR", "", "", ""]
        return [r.arch, r.kernel, r.dtype, r.config, *("-" if v is None else str(v) for v in usage),
                "yes" if r.picked else "no"]

    table = [list(COLUMNS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table)
