"""What a benchmark returns — a :class:`Table` of numbers — and the one function that prints it.

A benchmark measures; it does not format. Its rows are dicts of plain numbers (seconds, bytes, ratios), so tests
and notebooks read the data, and :func:`format_table` lays every table out the same way::

    <heading>                                   (optional: a chapter's table shown inside another benchmark)
    <title>; CPU: <cpu>                         (the run: sizes, dtype, threads — and the machine)
    <intro lines>
    <header>                                    (one cell per Column: sep + label + header, right-aligned)
    ----------                                  (rule=True)
    <one line per row>
    <notes>                                     (targets and how things were measured)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

MISSING = "—"  # a value that was not measured (e.g. a path skipped at a size where it needs GiBs)


@dataclass(frozen=True)
class Column:
    """One column of a :class:`Table`.

    A cell is ``format(row[key] * scale, fmt) + suffix`` (``fmt=""``: ``str(value)``), or ``text(row)`` when given,
    or ``—`` when the value is None; it is aligned (``align``: ">" right, "<" left) in ``width`` characters and
    preceded by ``sep``. ``label`` is a group name printed before the header cell only (``"fwd ms: "``); rows
    get as many blanks there.
    """

    key: str
    header: str = ""
    width: int = 8
    fmt: str = ".1f"
    scale: float = 1.0
    suffix: str = ""
    sep: str = " "
    label: str = ""
    align: str = ">"
    text: Callable[[dict], str] | None = None

    def head(self) -> str:
        return f"{self.sep}{self.label}{self.header:{self.align}{self.width}}"

    def cell(self, row: dict) -> str:
        if self.text is not None:
            s = self.text(row)
        else:
            v = row.get(self.key)
            if v is None:
                s = MISSING
            elif self.fmt == "":
                s = str(v) + self.suffix
            else:
                s = format(v * self.scale if self.scale != 1.0 else v, self.fmt) + self.suffix
        return f"{self.sep}{' ' * len(self.label)}{s:{self.align}{self.width}}"


@dataclass
class Table:
    """A benchmark's result: ``rows`` (dicts of numbers, one per size or variant) and how to print them.

    ``values`` holds the numbers the notes quote (the targets: e.g. ``{"numba_vs_sdpa_at_2048": 1.4}``), so a test
    or a notebook reads them without parsing text.
    """

    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    intro: list[str] = field(default_factory=list)
    heading: str = ""
    rule: bool = True

    def column(self, key: str) -> list:
        """The values of one column, in row order."""
        return [row.get(key) for row in self.rows]


def format_table(table: Table, cpu: str | None = None) -> str:
    """The table as text: heading, title (naming ``cpu`` when given), intro, header, rule, rows, notes."""
    lines = [table.heading] if table.heading else []
    if table.title:
        lines.append(f"{table.title}; CPU: {cpu}" if cpu else table.title)
    lines += table.intro
    header = "".join(c.head() for c in table.columns)
    lines.append(header)
    if table.rule:
        lines.append("-" * len(header))
    lines += ["".join(c.cell(row) for c in table.columns) for row in table.rows]
    lines += table.notes
    return "\n".join(lines)


def format_tables(tables: list[Table], cpu: str | None = None) -> str:
    """Several tables of one benchmark, a blank line between them."""
    return "\n\n".join(format_table(t, cpu) for t in tables)
