"""One table over several replays: hybrid against fifo, live and simulated, from their results.md.

    python reports/live_replay/repeats.py reports/live_replay/matched_load/results_*.md

Why: one live pair is noisy (fifo's own live goodput moved by 25% between back-to-back runs), so a
claim about direction rests on several. Each `make_report.py` run writes one results.md; this
reads their "Hybrid vs fifo in each driver" tables (generated, so their layout is known) and prints
the per-run figures and how many metrics kept their direction, the table the README quotes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SECTION = "## Hybrid vs fifo in each driver"
METRICS = ("goodput_rps", "slo_attainment", "ttft_p50_ms")


def comparison_rows(text: str) -> dict[str, list[str]]:
    """The section's table as {metric: cells}; a ValueError naming the fix when it is missing."""
    if SECTION not in text:
        raise ValueError(f"no '{SECTION}' table: give results.md files written by make_report.py")
    rows: dict[str, list[str]] = {}
    for line in text.split(SECTION, 1)[1].splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] not in ("metric", "") and not cells[0].startswith("---"):
            rows[cells[0]] = cells
    return rows


def started(text: str) -> str:
    match = re.search(r"fifo_live: started (\d\d:\d\d)", text)
    return match.group(1) if match else "?"


def table(paths: list[Path]) -> list[str]:
    lines = [
        "| run (fifo start, UTC) | fifo goodput live | hybrid goodput live | goodput change live | simulated |"
        " attainment change live | median TTFT change live | metrics in the same direction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        text = path.read_text()
        rows = comparison_rows(text)
        missing = [m for m in METRICS if m not in rows]
        if missing:
            raise ValueError(f"{path}: no row for {', '.join(missing)} in '{SECTION}'")
        good, att, ttft = (rows[m] for m in METRICS)
        verdicts = [cells[7] for cells in rows.values()]
        same = sum(v.startswith("same") for v in verdicts)
        lines.append(
            f"| {started(text)} | {good[1]} | {good[2]} | {good[3]} | {good[6]} | {att[3]} | {ttft[3]} |"
            f" {same} of {len(verdicts)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.md files written by make_report.py")
    args = parser.parse_args(argv)
    try:
        print("\n".join(table(args.results)))
    except (OSError, ValueError) as exc:
        print(f"repeats.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
