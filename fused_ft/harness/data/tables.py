"""Reading the metadata and list files of the datasets (Waterbirds' metadata.csv, DomainNet's lists), as
people and tools write them.

What is unambiguous is read: a UTF-8 byte-order mark, CRLF line endings, spaces around a field, quoted
fields, columns beyond the ones needed, and integers written as integral floats (``1.0``, what pandas'
``to_csv`` writes for a float column). Anything else is refused in one line that names the file, the
line, the column and what was expected (:class:`fused_ft.harness.data.DataError`).
"""
from __future__ import annotations

import csv
import io
import math
import shlex
from pathlib import Path
from typing import Iterator

__all__ = ["read_csv", "read_list", "integer"]


def _text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")  # drops a byte-order mark; other UTF-8 as it is


def _error(path: Path, line: int, column: str, value: str, expected: str, layout: str):
    from fused_ft.harness.data import DataError

    return DataError(f"Invalid data file {path}: line {line}, column {column}: {value!r} is not {expected}; "
                     f"expected {layout}")


def integer(text: str, path: Path, line: int, column: str, layout: str) -> int:
    """``text`` as an int: ``3``, `` 3 ``, ``3.0`` and ``+3`` are 3; ``3.5``, ``x`` and empty are refused."""
    value = text.strip()
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():
        raise _error(path, line, column, text, "an integer", layout)
    return int(number)


def read_csv(path: Path, columns: tuple[str, ...], layout: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row of a CSV file with a header naming at least ``columns``;
    values stripped of surrounding spaces, blank lines skipped."""
    reader = csv.reader(io.StringIO(_text(path), newline=""), skipinitialspace=True)
    header = next(reader, None)
    names = [name.strip() for name in header] if header else []
    missing = [c for c in columns if c not in names]
    if missing:
        from fused_ft.harness.data import DataError

        raise DataError(f"Invalid data file {path}: line 1 (the header) lacks the columns {', '.join(missing)} "
                        f"(it has {', '.join(names) or 'nothing'}); expected {layout}")
    where = {c: names.index(c) for c in columns}
    for row in reader:
        if not any(field.strip() for field in row):
            continue
        for column, i in where.items():
            if i >= len(row):
                raise _error(path, reader.line_num, column, "", f"present (the row has {len(row)} fields)", layout)
        yield reader.line_num, {c: row[i].strip() for c, i in where.items()}


def read_list(path: Path, layout: str) -> Iterator[tuple[int, str, int]]:
    """(line number, relative path, label) for each line ``<path> <label>`` of a list file; a path with
    spaces may be quoted, fields after the label are ignored, blank lines skipped."""
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = shlex.split(line, posix=True)
        except ValueError:  # an unclosed quote
            raise _error(path, number, "path", line, "a path and a label ('<path> <label>')", layout) from None
        if len(fields) < 2:
            raise _error(path, number, "label", line, "a path and a label ('<path> <label>')", layout)
        yield number, fields[0], integer(fields[1], path, number, "label", layout)
