"""The one table the GPU check prints at the end: measurement | value | limit | ok.

Tests add a row for every measurement BEFORE they assert on it, so a failing check still shows
its value. tests/gpu/conftest.py prints the table after the test summary and writes it (markdown
and JSON) to the output directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    measurement: str
    value: str
    limit: str  # the rule, in words or numbers; "-" when the value is only reported
    ok: bool | None  # None: reported, not checked


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, measurement: str, value: str, limit: str = "-", ok: bool | None = None) -> bool:
        """Record one row; returns ``ok`` (True for a reported-only row) so tests can assert on it."""
        self.rows.append(Row(measurement, value, limit, ok))
        return ok is not False

    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.ok is False]

    def render(self) -> list[str]:
        header = ["measurement", "value", "limit", "ok"]
        cells = [[r.measurement, r.value, r.limit, _ok(r.ok)] for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]

        def line(row: list[str]) -> str:
            return "| " + " | ".join(text.ljust(w) for text, w in zip(row, widths)) + " |"

        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return [line(header), rule, *(line(row) for row in cells)]

    def write(self, directory: Path, title: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "table.md").write_text(f"# {title}\n\n" + "\n".join(self.render()) + "\n")
        (directory / "table.json").write_text(json.dumps([asdict(r) for r in self.rows], indent=1))


def _ok(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


TABLE = Table()
