"""Rendering result rows (dicts) as a text table, markdown, CSV or JSON: shared by the CLI reports."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable, Sequence

FORMATS = ("table", "md", "csv", "json")


def render(rows: list[dict[str, Any]], fmt: str, header: Sequence[str],
           cells: Callable[[dict[str, Any]], Sequence[str]], text_columns: int = 1) -> str:
    """JSON/CSV carry every field of ``rows``; table/md show ``header`` with ``cells(row)``, the first
    ``text_columns`` left-aligned and the rest (numbers) right-aligned."""
    if fmt not in FORMATS:
        raise ValueError(f"Invalid format: {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    body = [[str(c) for c in cells(r)] for r in rows]
    if fmt == "md":
        rule = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
        return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(values):
        return "  ".join(v.ljust(w) if i < text_columns else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
