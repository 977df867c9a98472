"""Result tables for every command, in four formats: `table` (plain text that stays readable at 80 columns),
`markdown`, `csv` and `json` (strict: NaN and infinities become null).

    t = ResultTable("compare", [Col("method", "method", "l"), Col("accuracy", "acc %", fmt=pct)])
    t.add({"method": "pool", "budget": 64, "accuracy": 0.91}, note="...")    # note -> a footnote [1]
    print(t.render("table", width=80))

Nothing is ever truncated: a table wider than `width` is split into column blocks, each repeating the key
columns (method, budget); long notes are footnotes under the table, identical notes share a number.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import textwrap
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import VtpruneError

FORMATS = ("table", "markdown", "csv", "json")
MIN_WRAP = 24  # narrowest width a wrapped text column is given


@dataclass
class Col:
    """One column: the record key, its header, alignment ('l' or 'r') and a formatter for text formats."""

    key: str
    header: str
    align: str = "r"
    fmt: Callable[[Any], str] | None = None
    wrap: bool = False  # long text: wrapped onto several lines in the `table` format (never cut)

    def text(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return self.fmt(value) if self.fmt is not None else str(value)


@dataclass
class ResultTable:
    """Rows (dicts of raw values) plus how to show them; `notes` per row become numbered footnotes."""

    title: str
    columns: list[Col]
    key_columns: int = 2
    rows: list[dict] = field(default_factory=list)
    row_notes: list[str | None] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)  # un-numbered lines under the table

    def add(self, record: dict, note: str | None = None) -> None:
        self.rows.append(record)
        self.row_notes.append(note or None)

    def render(self, fmt: str = "table", width: int | None = None) -> str:
        check_format(fmt)
        if fmt == "json":
            return to_json({"title": self.title, "rows": self._records(), "notes": self.footer})
        if fmt == "csv":
            return self._csv()
        cells, marks = self._cells()
        if fmt == "markdown":
            return self._markdown(cells, marks)
        return self._text(cells, marks, width or terminal_width())

    # --- pieces --------------------------------------------------------------------------------------------
    def _records(self) -> list[dict]:
        out = []
        for row, note in zip(self.rows, self.row_notes, strict=True):
            out.append({**row, "note": note} if note else dict(row))
        return out

    def _footnotes(self) -> tuple[list[str], list[int | None]]:
        texts: list[str] = []
        marks: list[int | None] = []
        for note in self.row_notes:
            if not note:
                marks.append(None)
                continue
            if note not in texts:
                texts.append(note)
            marks.append(texts.index(note) + 1)
        return texts, marks

    def _cells(self) -> tuple[list[list[str]], list[int | None]]:
        _, marks = self._footnotes()
        cells = []
        for row, mark in zip(self.rows, marks, strict=True):
            line = [c.text(row.get(c.key)) for c in self.columns]
            if mark is not None:
                line[0] = f"{line[0]} [{mark}]"
            cells.append(line)
        return cells, marks

    def _csv(self) -> str:
        records = self._records()
        keys: list[str] = []
        for r in records:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({k: _csv_value(v) for k, v in r.items()})
        return buf.getvalue()

    def _markdown(self, cells: list[list[str]], marks: list[int | None]) -> str:
        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        lines = [f"**{esc(self.title)}**", ""] if self.title else []
        lines.append("| " + " | ".join(esc(c.header) for c in self.columns) + " |")
        lines.append("|" + "|".join("---:" if c.align == "r" else ":---" for c in self.columns) + "|")
        lines += ["| " + " | ".join(esc(x) for x in row) + " |" for row in cells]
        notes, _ = self._footnotes()
        if notes or self.footer:
            lines.append("")
            lines += [f"[{i}] {esc(n)}  " for i, n in enumerate(notes, 1)]
            lines += [f"{esc(f)}  " for f in self.footer]
        return "\n".join(lines) + "\n"

    def _text(self, cells: list[list[str]], marks: list[int | None], width: int) -> str:
        heads = [c.header for c in self.columns]
        natural = [max([width_of(h), *(width_of(r[i]) for r in cells)]) for i, h in enumerate(heads)]
        wraps = [c.wrap for c in self.columns]
        widths = [min(w, max(MIN_WRAP, width_of(heads[i]))) if wraps[i] else w for i, w in enumerate(natural)]
        blocks = _blocks(widths, min(self.key_columns, len(widths)), width)
        for cols in blocks:  # wrapped columns take the room left in their block, up to their natural width
            spare = width - (sum(widths[i] for i in cols) + 2 * (len(cols) - 1))
            for i in cols:
                if wraps[i] and spare > 0:
                    grow = min(spare, natural[i] - widths[i])
                    widths[i] += grow
                    spare -= grow
        out: list[str] = []
        if self.title:
            out += textwrap.wrap(self.title, width) or [""]
        for b, cols in enumerate(blocks):
            if b:
                out.append("")

            def fmt_row(values: Sequence[str], cols: list[int] = cols) -> list[str]:
                pieces = {i: (textwrap.wrap(values[i], widths[i]) or [""]) if wraps[i] else [values[i]] for i in cols}
                lines = []
                for k in range(max(len(p) for p in pieces.values())):
                    parts = []
                    for i in cols:
                        text = pieces[i][k] if k < len(pieces[i]) else ""
                        parts.append(_pad(text, widths[i], self.columns[i].align))
                    lines.append("  ".join(parts).rstrip())
                return lines

            out += fmt_row(heads)
            out.append("  ".join("-" * widths[i] for i in cols))
            for r in cells:
                out += fmt_row(r)
        notes, _ = self._footnotes()
        for i, note in enumerate(notes, 1):
            out += textwrap.wrap(f"[{i}] {note}", width, subsequent_indent=" " * (len(str(i)) + 3)) or [""]
        for line in self.footer:
            out += textwrap.wrap(line, width) or [""]
        return "\n".join(out) + "\n"


def width_of(text: str) -> int:
    """Columns `text` takes in a terminal (combining marks, as in n̄, take none)."""
    return sum(0 if unicodedata.combining(ch) else 1 for ch in text)


def _pad(text: str, width: int, align: str) -> str:
    gap = " " * max(0, width - width_of(text))
    return gap + text if align == "r" else text + gap


def _blocks(widths: list[int], keys: int, width: int) -> list[list[int]]:
    """Split column indices into blocks that fit `width` (2 spaces between columns), each starting with the
    first `keys` columns. A column that cannot fit even alone with the keys gets a block of its own."""
    key_cols = list(range(keys))
    key_w = sum(widths[:keys]) + 2 * max(0, keys - 1)
    blocks: list[list[int]] = []
    current = list(key_cols)
    used = key_w
    for i in range(keys, len(widths)):
        need = widths[i] + (2 if current else 0)
        if len(current) > keys and used + need > width:
            blocks.append(current)
            current, used = list(key_cols), key_w
            need = widths[i] + (2 if current else 0)
        current.append(i)
        used += need
    blocks.append(current)
    return blocks


def _csv_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_strict(value), allow_nan=False)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def _strict(value: Any) -> Any:
    """NaN / inf -> None, tuples -> lists, tensors / numpy scalars -> Python numbers, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # torch / numpy
        return _strict(value.tolist())
    return value


def to_json(value: Any, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null; other non-JSON values via `str`."""
    return json.dumps(_strict(value), indent=indent, allow_nan=False, default=str) + "\n"


def write_json(path, value: Any) -> None:
    """Write strict JSON to `path` (creating its folder)."""
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(to_json(value))


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise VtpruneError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def terminal_width() -> int:
    """The terminal's width when stdout is one, else 80."""
    try:
        if sys.stdout.isatty():
            return max(40, shutil.get_terminal_size((80, 24)).columns)
    except (AttributeError, ValueError):
        pass
    return 80


# --- number formats ---------------------------------------------------------------------------------------
def pct(value: float) -> str:
    """0.9133 -> '91.3'."""
    return f"{100 * value:.1f}"


def si(value: float, unit: str = "FLOPs") -> str:
    """1.606e8 -> '160.6 MFLOPs'; 2.3e12 -> '2.30 TFLOPs' (never '0.0001606 TFLOPs')."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            v = value / scale
            return f"{v:.3g} {prefix}{unit}" if v < 100 else f"{v:.0f} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def budget(value: Any) -> str:
    """64 -> '64'; 1/9 -> '0.1111'; 'all' -> 'all'."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def from_rich(table) -> ResultTable:
    """A `rich.table.Table` (commands whose tables are built elsewhere) -> `ResultTable` of its cell texts,
    so every format works for it too (markup removed)."""
    from rich.text import Text

    def plain(value: Any) -> str:
        return value.plain if isinstance(value, Text) else Text.from_markup(str(value)).plain

    heads = [plain(c.header) or f"c{i}" for i, c in enumerate(table.columns)]
    title = plain(table.title) if table.title else ""
    out = ResultTable(title, [Col(h, h, "l" if i == 0 else "r") for i, h in enumerate(heads)], key_columns=1)
    columns = [[plain(c) for c in col._cells] for col in table.columns]
    for r in range(table.row_count):
        out.add({h: columns[i][r] for i, h in enumerate(heads)})
    return out
