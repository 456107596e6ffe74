"""Benchmark results: one ``Result`` per measurement, written as JSON and as a Markdown table.

``runs/bench/results.json`` is a list of objects with exactly the fields of ``Result``
(name, value, unit, baseline_value, ratio, notes); ``results.md`` is the same as a table. The
ratio is always value / baseline_value (ours / baseline), None without a baseline. Most units are
"more is better" (samples/s, tokens/s, GB/s, MFU): ratio >= 1.0 means we are at least as fast.
Units that say "lower is better" (memory) read the other way round.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Result:
    name: str
    value: float | None  # None: skipped (the notes say why)
    unit: str
    baseline_value: float | None = None
    ratio: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline_value:
            self.ratio = self.value / self.baseline_value


def skipped(name: str, unit: str, reason: str) -> Result:
    return Result(name=name, value=None, unit=unit, notes=f"skipped: {reason}")


def _number(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude >= 100:
        return f"{x:,.0f}"
    if magnitude >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def markdown_table(results: list[Result]) -> str:
    lines = [
        "| measurement | ours | unit | baseline | ratio | notes |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in results:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        notes = r.notes.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {_number(r.value)} | {r.unit} | {_number(r.baseline_value)} | {ratio} | {notes} |")
    return "\n".join(lines) + "\n"


def write(results: list[Result], out_dir: Path, header: str = "") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    md_path.write_text((header.rstrip() + "\n\n" if header else "") + markdown_table(results))
    return json_path, md_path


def section_main(run, description: str) -> int:
    """Command line of one benchmark section run alone: ``python -m bench.<section> [--quick]``."""
    import argparse

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    print(markdown_table(run(ap.parse_args().quick)))
    return 0
